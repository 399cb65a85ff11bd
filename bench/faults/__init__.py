"""Fault injection: does the pipeline survive kills, corrupt artifacts and bad inputs?

    python -m bench.faults [--small]     # __main__.py: run.py's `main`

- run.py: the harness (`run`, `main`), the reference run and every set of cases in turn;
- workspace.py: the scratch git + DVC copy of the tiny preset, its reference and what cases need;
- kills.py, corrupt.py, inputs.py: kill points, corruptions and bad inputs, each a corpus and a runner;
- repro.py and repro_cases.py: bad edits through `dvc repro` on the finished workspace, and their corpus;
- report.py: the markdown tables of bench/results/faults[-small].md.
"""
