"""Fixtures shared by the benchmarks.

* ``digits``: scikit-learn's 8x8 digits, the benchmark MLP and CNN, their settings;
* ``timing``: timers, interleaved comparisons, peak memory, log lines;
* ``reference``: a careful straightforward influence implementation to compare with;
* ``child``: a benchmark case in a child process, with a time budget and a memory limit;
* ``session``: the rows' shared state (data, trained models, one results table) and
  their command line;
* ``report``: markdown tables, the machine header and plots.
"""
