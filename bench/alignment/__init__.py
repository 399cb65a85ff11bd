"""The alignment benchmark on the toy task, from the shipped base bench/toy/base/:

    python -m bench.alignment              # alignment.py: GRPO variants trained to equal compute
    python -m bench.alignment.toy_probe    # toy_probe.py: where a toy base fails, per reward component
"""
