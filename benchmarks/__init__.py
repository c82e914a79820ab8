"""graphprune's benchmarks: what a user runs to check the product's claims on real weights and images.

Run them from the repository root as modules, e.g. ``python -m benchmarks.compare_methods report``:

* ``latency_profile``: the latency backend's noise, the additivity of block savings, profiling time;
* ``compare_methods`` (rows in ``compare_rows``, report in ``compare_report``, the filter-l1
  baseline's pruning in ``filter_l1``): graphprune against its peers; ``device_rows`` sends the
  rows' recoveries to a lent GPU as ``jobs`` jobs;
* ``optimize_bar``: the CLI end to end on ResNet-56 at 22%, timed.

Results are in ``benchmarks/results/``; the one-off research studies behind the defaults are in
``benchmarks.studies``; the benchmarks' own tests in ``benchmarks/tests`` (``make bench-test``).
"""
