"""What runs the stages, and no stage itself: the stages' shared helpers and runner (`common`: argument
parsing, parameter loading, exit codes, the summary line), the launcher that starts a stage on several
processes (`launch`), the watchdog that ends a stage whose starter died (`watchdog`), and the warm
stage runner (`warm`, the server: `python -m stages.runtime.warm`; `warm_client`, the side every stage
process runs first).
"""
