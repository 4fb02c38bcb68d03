"""The hostile probes of issue 14 §1-§3 (the code sandbox, ingest, silent wrong results), run and listed.

    .venv/bin/python bench/bench_reliability.py

Each probe is a regression test that failed before its fix (an escape that got out, a row ingest lost, a wrong
answer given with exit code 0) and passes when the attack or the loss is stopped. This script does not repeat the
tests' code: it runs the test node ids listed in PROBES below, grouped by section, in one pytest process, reads its
JUnit XML and writes bench/results/reliability.json (per test case: section, node id, the probe in words, outcome,
skip reason or failure message, seconds) and reliability.md (one table per section), with the sandbox tool found
(`bwrap --version`) and the machine (platform, cores, load average). A listed test that pytest cannot find, or that
yields no result, stops the script with an error: a renamed test fails loudly instead of dropping a probe. The
script exits 1 when a probe fails, after writing its results.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

REWARDS = "tests/train/test_rewards.py"
STORE = "tests/rag/test_store.py"
DOCUMENTS = "tests/rag/test_documents.py"
CLI = "tests/rag/test_cli.py"
SEARCH = "tests/rag/test_search.py"
EVALUATE = "tests/rag/test_evaluate.py"

# section -> (its title, the node ids of its probes: a test function, all its cases, or one case of it)
PROBES: dict[str, tuple[str, list[str]]] = {
    "§1": (
        "The code sandbox holds (train/rewards.py)",
        [
            f"{REWARDS}::test_escape_writing_outside_tmp_fails",
            f"{REWARDS}::test_escape_reading_secrets_fails",
            f"{REWARDS}::test_escape_ctypes_system_fails",
            f"{REWARDS}::test_escape_forked_setsid_children_die_with_the_call",
            f"{REWARDS}::test_escape_unix_sockets_fails",
            f"{REWARDS}::test_escape_tcp_to_loopback_fails_with_ctypes_too",
            f"{REWARDS}::test_escape_parent_environment_fails",
            f"{REWARDS}::test_escape_forging_the_verdict_through_the_runners_frames_fails",
            f"{REWARDS}::test_plan_tests_sends_only_what_needs_the_solution",
            f"{REWARDS}::test_split_tests_give_the_verdicts_python_gives",
            f"{REWARDS}::test_infinite_loop_is_killed",
            f"{REWARDS}::test_memory_bomb_is_stopped",
            f"{REWARDS}::test_limits_hold_in_the_child_and_a_fork_bomb_is_capped",
            f"{REWARDS}::test_a_clean_private_tmp_and_an_empty_environment",
            f"{REWARDS}::test_no_bubblewrap_fails_closed_and_says_what_to_install",
            f"{REWARDS}::test_process_isolation_is_opt_in_and_logged",
        ],
    ),
    "§2": (
        "Ingest loses nothing and names every failure",
        [
            f"{STORE}::test_jsonl_rows_are_keyed_by_source_and_id",
            "tests/rag/test_contextual.py::test_each_document_of_an_id_two_sources_share_gets_its_own_window",
            f"{STORE}::test_a_store_keyed_by_doc_id_alone_is_migrated_keeping_everything",
            f"{STORE}::test_sources_are_absolute_and_prune_from_another_folder_removes_only_what_is_gone",
            f"{STORE}::test_a_missing_or_unreadable_path_is_a_named_failure_and_the_rest_goes_on",
            f"{CLI}::test_ingest_of_a_missing_path_names_it_and_stores_the_rest",
            f"{STORE}::test_links_and_unreadable_folders_in_a_walk_are_listed_as_failures",
            f"{DOCUMENTS}::test_html_with_an_unclosed_head_keeps_its_body",
            f"{STORE}::test_a_file_name_that_is_not_utf8_is_ingested_searched_and_kept_by_prune",
            f"{DOCUMENTS}::test_clean_stream_is_clean_whatever_the_blocks",
            f"{DOCUMENTS}::test_a_text_file_is_read_and_cleaned_as_a_stream",
            f"{STORE}::test_embedding_streams_the_missing_chunks_from_the_database",
            f"{CLI}::test_out_of_range_flags_are_refused_naming_the_flag[args5---batch-size 0]",
        ],
    ),
    "§3": (
        "No silent wrong results",
        [
            "tests/model/test_checkpoint.py::test_fewer_layers_in_config_json_than_in_the_weights_is_an_error",
            f"{EVALUATE}::test_trec_qrels_read_as_the_beir_ones",
            f"{EVALUATE}::test_qrels_in_another_format_are_refused_naming_the_line",
            f"{CLI}::test_eval_beir_counts_and_warns_about_qrels_ids_not_in_the_corpus",
            f"{CLI}::test_out_of_range_flags_are_refused_naming_the_flag",
            f"{SEARCH}::test_out_of_range_search_settings_are_refused_naming_the_flag",
            f"{SEARCH}::test_search_depth_below_one_is_refused",
            f"{SEARCH}::test_ann_with_k_beyond_the_store_returns_each_chunk_once",
        ],
    ),
}

HEADING = "## Reliability: the hostile probes of issue 14 §1–§3 (sandbox, ingest, silent results)"


def split(node: str) -> tuple[str, str, str | None]:
    """'path::function[case]' -> (path, function, case or None)."""
    path, _, name = node.partition("::")
    function, bracket, case = name.partition("[")
    return path, function, case[:-1] if bracket else None


def find_test(path: str, function: str) -> ast.FunctionDef:
    for node in ast.parse((ROOT / path).read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return node
    raise SystemExit(f"bench_reliability: {path} has no function {function}: renamed? update PROBES")


def in_words(path: str, function: str) -> str:
    """The summary line of the test's docstring (its first paragraph: some wrap), else its name as words."""
    doc = ast.get_docstring(find_test(path, function))
    if doc:
        return " ".join(doc.strip().split("\n\n")[0].split())
    return function.removeprefix("test_").replace("_", " ")


def case_label(node: str) -> str:
    """A parametrized case's id without the id pytest generates for an argument it cannot name (its name and index):
    'test_f[args5---batch-size 0]' -> '--batch-size 0'."""
    path, function, case = split(node)
    args = [a.arg for a in find_test(path, function).args.args]
    generated = "|".join(re.escape(a) for a in args)
    return re.sub(rf"^(?:(?:{generated})\d+-)+", "", case or "") if args else case or ""


def to_run(nodes: list[str]) -> list[str]:
    """The node ids to pass to pytest: each once, a case left out when its whole function is listed too."""
    functions = {n for n in nodes if "[" not in n}
    out = []
    for node in dict.fromkeys(nodes):
        if "[" in node and node.split("[", 1)[0] in functions:
            continue
        out.append(node)
    return out


def run_pytest(nodes: list[str], junit: Path) -> tuple[list[str], subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *nodes]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return cmd, proc, time.perf_counter() - t0


def read_junit(junit: Path) -> list[dict]:
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/") + ".py"
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (found.get("message") or found.text or "").strip()
                detail = (f"{tag}: " if tag == "error" else "") + message.splitlines()[0] if message else tag
                break
        cases.append(
            {
                "node": f"{path}::{case.get('name')}",
                "outcome": outcome,
                "detail": detail,
                "seconds": float(case.get("time", 0)),
            }
        )
    return cases


def match(probe: str, cases: list[dict]) -> list[dict]:
    if "[" in probe:
        return [c for c in cases if c["node"] == probe]
    return [c for c in cases if c["node"] == probe or c["node"].startswith(probe + "[")]


def sandbox_tool() -> str:
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return "bubblewrap not installed (the sandbox fails closed; its escape probes need it)"
    ran = subprocess.run([bwrap, "--version"], capture_output=True, text=True)
    return f"{(ran.stdout or ran.stderr).strip()} ({bwrap})"


def machine() -> dict:
    load = os.getloadavg()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
        "user": "root" if os.geteuid() == 0 else "not root",
    }


def result_cell(cases: list[dict]) -> str:
    """One row's result: passed / failed / skipped, its cases named when few and short, and why not passed."""
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    if len(cases) == 1:
        c = cases[0]
        return c["outcome"] + (f" ({c['detail']})" if c["detail"] else "") + f", {c['seconds']:.1f} s"
    seconds = sum(c["seconds"] for c in cases)
    labels = [case_label(c["node"]) for c in cases]
    named = len(cases) <= 6 and all(len(label) <= 40 for label in labels)
    if counts["passed"] == len(cases):
        text = f"passed, {len(cases)} of {len(cases)} cases"
        if named:
            text += ": " + ", ".join(f"`{label}`" for label in labels)
        return text + f", {seconds:.1f} s"
    parts = [f"{n} {o}" for o, n in counts.items() if n]
    notes = [
        f"`{label}` {c['outcome']}" + (f" ({c['detail']})" if c["detail"] else "")
        for c, label in zip(cases, labels, strict=True)
        if c["outcome"] != "passed"
    ]
    return ", ".join(parts) + f" of {len(cases)} cases: " + "; ".join(notes) + f", {seconds:.1f} s"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    all_nodes = [node for _, nodes in PROBES.values() for node in nodes]
    words = {node: in_words(*split(node)[:2]) for node in all_nodes}  # checks every function exists
    nodes = to_run(all_nodes)
    at_start = machine()
    tool = sandbox_tool()
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "reliability.xml"
        cmd, proc, wall = run_pytest(nodes, junit)
        if proc.returncode not in (0, 1) or not junit.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(
                f"bench_reliability: pytest exited {proc.returncode}: a probe in PROBES is not found?"
            )
        cases = read_junit(junit)

    probes, rows = [], {}
    for section, (_, section_nodes) in PROBES.items():
        rows[section] = []
        for node in section_nodes:
            found = match(node, cases)
            if not found:
                raise SystemExit(f"bench_reliability: no result for {node}: renamed? update PROBES")
            probe = words[node] + (f" [`{case_label(node)}`]" if split(node)[2] else "")
            rows[section].append((probe, result_cell(found)))
            for c in found:
                probes.append(
                    {
                        "section": section,
                        "node": c["node"],
                        "probe": probe,
                        "case": split(c["node"])[2],
                        "outcome": c["outcome"],
                        "reason": c["detail"],
                        "seconds": round(c["seconds"], 3),
                    }
                )

    unique = {p["node"]: p["outcome"] for p in probes}
    total = {o: sum(v == o for v in unique.values()) for o in ("passed", "failed", "skipped")}
    pytest_cmd = " ".join(["python", *cmd[1:6], "--junitxml=TMP/reliability.xml", "NODE_IDS"])
    summary = {
        "command": "python bench/bench_reliability.py",
        "pytest": pytest_cmd,
        "node_ids": nodes,
        "pytest_exit": proc.returncode,
        "pytest_seconds": round(wall, 1),
        "sandbox": tool,
        "machine": at_start,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "totals": total,
        "probes": probes,
    }
    (RESULTS / "reliability.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    m = at_start
    lines = [
        HEADING,
        "",
        f"`python bench/bench_reliability.py`: runs the tests below in one `{pytest_cmd}` "
        f"(the node ids are listed in the script, grouped by section) and reads its JUnit XML. Each probe is a "
        "regression test that failed before its fix and passes when the attack or the loss is stopped. "
        f"Now: {total['passed']} of {len(unique)} test cases pass"
        + (f", {total['failed']} fail" if total["failed"] else "")
        + (f", {total['skipped']} skipped" if total["skipped"] else "")
        + ".",
        "",
        f"Sandbox tool: {tool}. Machine: {m['platform']}, Python {m['python']}, {m['cores']} cores, {m['user']}, "
        f"load average {' / '.join(f'{x:.2f}' for x in m['load_average'])} at the start; pytest took {wall:.0f} s.",
    ]
    for section, (title, section_nodes) in PROBES.items():
        files = sorted(dict.fromkeys(split(node)[0] for node in section_nodes))
        lines += [
            "",
            f"### {section} {title}",
            "",
            "Tests: " + ", ".join(f"`{f}`" for f in files) + ".",
            "",
            "| probe | result |",
            "|---|---|",
        ]
        lines += [f"| {cell(probe)} | {cell(result)} |" for probe, result in rows[section]]
    (RESULTS / "reliability.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'reliability.json'} and reliability.md: {total}")
    if total["failed"]:
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
