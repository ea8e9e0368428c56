"""Fixtures shared by the benchmarks.

* ``digits``: scikit-learn's 8x8 digits, the benchmark MLP and CNN, their settings;
* ``timing``: timers, interleaved comparisons, peak memory, log lines;
* ``reference``: a careful straightforward influence implementation to compare with;
* ``session``: the rows' shared state (data, trained models, one results table) and
  their command line;
* ``report``: markdown tables, the machine header and plots.
"""
