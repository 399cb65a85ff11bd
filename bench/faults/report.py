"""bench/results/faults.md: the fault-injection results of bench/faults/run.py as tables to read.

A summary per set of cases, what failed (and how), then every case; the JSON holds the same records.
"""

from __future__ import annotations

VERDICTS = ("fired", "resumed_equal", "detected_named", "clear", "passed")  # a "no" here is a failing case: in bold


def markdown(results: dict) -> str:
    command = f"python -m bench.faults{' --small' if results['version'] == 'small' else ''}"
    intro = (f"`{command}`: the tiny preset, {results['iterations']} iterations, reference `{results['reference']}`; "
             f"{results['seconds']} s on {results['cores']} CPU cores, {results['warm_stage_runs']} stage runs warm. "
             "Cases and definitions: bench/faults/kills.py, bench/faults/corrupt.py, bench/faults/inputs.py, "
             "bench/faults/repro.py (corpus: bench/faults/repro_cases.py).")
    cases = results["cases"]
    lines = [f"# Fault injection ({results['version']} version)", "", intro, "", *_summary_rows(results), "",
             *_failures(cases)]
    lines += _table("Kill points", ["case", "place", "fired", "outputs in place at kill", "orphans", "resume exit",
                                    "resumed equal", "lost", "note"], cases["kill_points"],
                    ["case", "place", "fired", "outputs_in_place_at_kill", "orphans", "resume_exit", "resumed_equal",
                     "lost", "note"])
    rows = [{**case, "reader_message": message(case["reader_first_line"], case["reader_last_line"])}
            for case in cases["corruptions"]]
    lines += _table("Corruptions", ["case", "DVC sees it", "reader", "reader exit", "reader's error",
                                    "reader's outputs differ", "detected", "repaired by"], rows,
                    ["case", "dvc_detected", "reader", "reader_exit", "reader_message", "reader_silent",
                     "detected_named", "repaired_by"])
    rows = [{**case, "message": message(case["first_line"], case["last_line"])} for case in cases["bad_inputs"]]
    lines += _table("Bad inputs", ["case", "run", "expected", "names", "got", "first stderr line / answer", "clear"],
                    rows, ["case", "run", "expected", "names", "exit", "message", "clear"])
    lines += _repro(results, cases.get("repro", []))
    return "\n".join(lines) + "\n"


def message(first: str, last: str) -> str:
    """A stage's error as a reader wants it: the first stderr line, or after a traceback its exception."""
    return f"traceback: {last}" if first.startswith("Traceback") else first


def _summary_rows(results: dict) -> list[str]:
    kills, corruptions, inputs = (results[key] for key in ("kill_points", "corruptions", "bad_inputs"))
    killed = (f"{kills['resumed_equal']} resumed equal to the reference; orphaned processes: {kills['orphans']}; "
              f"artifacts lost: {results['lost']}")
    corrupted = (f"{corruptions['detected_named']} detected (by DVC: {corruptions['dvc_detected']}; the reading stage "
                 f"named the file in {corruptions['reader_named']} of {corruptions['reader_tried']} runs and succeeded "
                 f"with other outputs in {corruptions['reader_silent']}); {corruptions['ended_correct']} ended correct")
    refused = (f"{inputs['clear_exit2']} clear (exit code 2 and a first stderr line naming the key or file; the "
               "reward server: the expected HTTP status)")
    rows = ["| set | tried | result |", "| --- | ---: | --- |", f"| kill points | {kills['tried']} | {killed} |",
            f"| corruptions | {corruptions['tried']} | {corrupted} |",
            f"| bad inputs | {inputs['tried']} | {refused} |"]
    if "repro" in results:
        repro = results["repro"]
        rows.append(f"| bad inputs through `dvc repro` on a finished workspace | {repro['tried']} | {repro['passed']} "
                    f"passed; a stage exited 2 naming the key or file in {repro['exit2_named']}; finished outputs "
                    f"lost in {repro['lost']} cases ({repro['lost_outputs']} outputs) |")
    return rows


def _failures(cases: dict) -> list[str]:
    """One line per failing case, and per damaged input a reading stage did not name (DVC saw those)."""
    failing = [f"- kill point `{case['case']}`: {case['note']}" for case in cases["kill_points"]
               if not case["resumed_equal"] or case["note"]]
    failing += [f"- corruption `{case['case']}`: detected {case['detected_named']}, repaired by {case['repaired_by']}"
                for case in cases["corruptions"] if not (case["detected_named"] and case["ended_correct"])]
    failing += [f"- bad input `{case['case']}` ({case['run']}): expected {case['expected']} naming "
                f"`{case['names']}`, got {case['exit']}: {message(case['first_line'], case['last_line'])}"
                for case in cases["bad_inputs"] if not case["clear"]]
    failing += [f"- repro `{case['case']}`: expected {case['expect']} naming `{case['names']}`, got dvc exit "
                f"{case['dvc_exit']}, stage {case['failed_stage']} exit {case['stage_exit']}: {case['first_line']}"
                f"{' (traceback: ' + case['stage_last_line'] + ')' if case['traceback'] else ''}"
                f"{'; lost ' + str(len(case['lost'])) + ' outputs' if case['lost'] else ''}"
                for case in cases.get("repro", []) if not case["passed"]]
    unnamed = [f"- `{case['case']}`: {case['reader']} exit {case['reader_exit']}"
               f"{' with outputs other than the reference' if case['reader_silent'] else ''}"
               f"{': ' + message(case['reader_first_line'], case['reader_last_line']) if case['reader_exit'] else ''}"
               for case in cases["corruptions"] if case["reader"] and not case["reader_named"]]
    lines = ["## Failing cases", "", *(failing or ["None."]), ""]
    return [*lines, "## Damaged inputs the reading stage did not name (DVC saw them)", "", *(unnamed or ["None."]), ""]


def _repro(results: dict, cases: list[dict]) -> list[str]:
    """The repro cases: which lost finished outputs (and which outputs), then every case."""
    if not cases:
        return []
    lost = [f"- `{case['case']}` ({case['failed_stage'] or 'no stage'}): {', '.join(case['lost'])}"
            for case in cases if case["lost"]]
    lines = ["## Bad inputs through `dvc repro`: finished outputs lost", "",
             "Every output of the reference dvc.lock (cached, and `cache: false` metrics and plots) checked by "
             "its md5 after the run; a stage's outputs are removed by DVC before its command runs.", "",
             *(lost or ["None."]), ""]
    rows = [{**case, "stage": f"{case['failed_stage']}: {case['stage_exit']}" if case["failed_stage"] else "",
             "lost_count": len(case["lost"])} for case in cases]
    return lines + _table("Bad inputs through `dvc repro`", ["case", "category", "expected", "names", "dvc exit",
                                                              "failed stage: exit", "first message line", "lost",
                                                              "passed"], rows,
                          ["case", "category", "expect", "names", "dvc_exit", "stage", "first_line", "lost_count",
                           "passed"])


def _table(title: str, header: list[str], rows: list[dict], keys: list[str]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), key) for key in keys) + " |")
    return [*lines, ""]


def _cell(value, key: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else ("**no**" if key in VERDICTS else "no")
    if isinstance(value, list):
        value = len(value)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
