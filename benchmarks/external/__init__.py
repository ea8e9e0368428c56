"""Row 5: tf_influence against other influence libraries on one shared workload.

Each library runs in its own virtualenv (``setup_envs.sh``), as
``<venv>/bin/python -m benchmarks.external.<module>`` from the repository root; the
modules here import only NumPy and their own library. See README.md in this folder.
"""
