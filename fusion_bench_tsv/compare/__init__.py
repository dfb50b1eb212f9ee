"""``fusion-bench-tsv-compare``: tables and plots over FusionBench runs, and the baselines of a benchmark suite.

:mod:`.rows` reads runs (run directories, ``program_report.json`` files, stored comparison tables, a
``build.json``) into rows; :mod:`.baselines` runs FusionBench's baselines and ours on a suite in-process;
:mod:`.report` writes the table and the figure; :mod:`.cli` is the command.
"""
