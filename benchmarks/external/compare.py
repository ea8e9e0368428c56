"""Row 5 of the benchmarks: tf_influence against other influence libraries, one run.

Runs tf_influence on the shared workload in this process (timed), then each
external library's script with that library's venv python, one after the other
(never in parallel: the machine has 2 cores), reads their JSON results and prints
a markdown table: library | solver | params | seconds | ratio (their time / ours)
| Pearson vs ours-exact. Usage, with the tf_influence venv::

    python -m benchmarks.external.compare --workload /tmp/bench/workload.npz \
        --out /tmp/bench/results

``--no-run-external`` only reads the JSON files already in ``--out``.
See README.md in this folder for what each library computes and how its scores
are converted to our convention.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np

from benchmarks.external.common import Results, Timer, Workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXTERNAL = [
    # (library, module in benchmarks.external, venv python option, extra arguments, tag)
    ("influenciae", "run_influenciae", "influenciae_python", [], ""),
    ("torch-influence", "run_torch_influence", "torch_python", [], ""),
    ("pydvl", "run_pydvl", "torch_python", [], ""),
]
# 1437 = 3 x 479: with equal batches pyDVL's unweighted average of batch Hessians (the
# operator behind its CG) is the mean Hessian. A second pyDVL run, and ours, use it.
EQUAL_BATCH = 479
EQUAL_TAG = f"@b{EQUAL_BATCH}"
EXTERNAL.append(
    (
        "pydvl",
        "run_pydvl",
        "torch_python",
        ["--batch-size", str(EQUAL_BATCH), "--only", "A-cg,B-cg", "--tag", EQUAL_TAG],
        EQUAL_TAG,
    )
)
SOLVER_NAMES = {"exact": "exact", "cg": "CG"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="/tmp/bench/workload.npz")
    parser.add_argument("--out", default="/tmp/bench/results")
    parser.add_argument("--influenciae-python", default="/tmp/bench-influenciae/bin/python")
    parser.add_argument("--torch-python", default="/tmp/bench-torch/bin/python")
    parser.add_argument(
        "--no-run-external",
        dest="run_external",
        action="store_false",
        help="do not run the external scripts; read their JSON from --out",
    )
    parser.add_argument(
        "--no-run-ours",
        dest="run_ours",
        action="store_false",
        help="do not run tf_influence; read ours.json from --out",
    )
    parser.add_argument(
        "--ours-b-exact",
        action="store_true",
        help="also try solver='exact' on workload B (26,122 parameters; needs > 24 GB)",
    )
    return parser.parse_args(argv)


# -- ours --------------------------------------------------------------------------------
def build_keras_model(work, bias_l2=False):
    import keras

    from benchmarks.external.export_workload import build_model

    model = build_model(keras, work.l2)
    if bias_l2:
        # The "matched" variant: L2 on biases too, so that H gets 2*l2 + damping on every
        # diagonal entry, as pyDVL's uniform `regularization` gives it.
        for layer in model.layers:
            layer.bias_regularizer = keras.regularizers.L2(work.l2)
        model = keras.Sequential.from_config(model.get_config())
    for layer in model.layers:
        layer.set_weights(list(work.weights[layer.name]))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def run_ours(work, out_dir, b_exact=False, tag="", batch_size=None, only=None):
    import keras
    import tensorflow as tf

    import tf_influence as tfi

    results = Results(
        "ours",
        getattr(tfi, "__version__", "0.1.0"),
        out_dir,
        framework=f"tensorflow {tf.__version__}, keras {keras.__version__}",
        tag=tag,
    )
    batch_size = batch_size or work.batch_size
    model = build_keras_model(work)
    matched = build_keras_model(work, bias_l2=True)
    for m in (model, matched):  # warm-up, not timed (as in every library's script)
        m(work.x_test, training=False)
    plans = [
        ("A", "exact", ["logits"], model, ""),
        ("A", "cg", ["logits"], model, ""),
        ("B", "cg", None, model, ""),
        ("A", "exact-matched", ["logits"], matched, "matched"),
        ("B", "cg-matched", None, matched, "matched"),
    ]
    if b_exact:
        plans.insert(3, ("B", "exact", None, model, ""))
    for workload, solver, params, net, variant in plans:
        if only is not None and f"{workload}-{solver}" not in only:
            continue
        try:
            with Timer() as timer:
                im = tfi.InfluenceModel(net, params=params)
                im.compile(solver=solver.split("-")[0], damping=work.damping)
                im.fit(work.x_train, work.y_train, batch_size=batch_size, verbose=0)
                scores = im.explain(work.x_test, work.y_test, verbose=0)
        except Exception as error:  # recorded in the JSON
            results.fail_run(workload, solver, error)
            continue
        diag = im.diagnostics
        results.add(
            workload,
            solver,
            im.num_params,
            scores,
            timer.seconds,
            1.0,
            "ours",
            settings={
                "batch_size": batch_size,
                "solver": repr(im.solver),
                "iterations": int(diag.iterations) if diag is not None else None,
                "max_relative_residual": float(np.max(diag.residual_norm))
                if diag is not None
                else None,
                "regularisation": "keras L2 kernel_regularizer (model.losses)"
                + (" + the same L2 on biases (matched to pyDVL)" if variant else ""),
            },
        )
    return results.write()


# -- externals ---------------------------------------------------------------------------
def run_external(args):
    logs = {}
    for library, module, option, extra, tag in EXTERNAL:
        python = getattr(args, option)
        log_path = os.path.join(args.out, f"{library}{tag}.log")
        command = [
            python,
            "-m",
            f"benchmarks.external.{module}",
            "--workload",
            args.workload,
            "--out",
            args.out,
            *extra,
        ]
        print(f"$ {' '.join(command)}  > {log_path}", flush=True)
        if not os.path.exists(python):
            Results(library, "?", args.out).not_installable(f"no venv python at {python}")
            continue
        start = time.perf_counter()
        with open(log_path, "w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        logs[library + tag] = (code, time.perf_counter() - start)
        print(f"  exit {code} after {logs[library + tag][1]:.0f} s", flush=True)
    return logs


# -- table -------------------------------------------------------------------------------
def load(out_dir, library):
    path = os.path.join(out_dir, f"{library}.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def submatrix(reference, run):
    rows = run["shape"][0]
    columns = run["columns"]
    ref = reference[:rows]
    return ref if columns is None else ref[:, columns]


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def fmt_seconds(seconds):
    return f"{seconds:,.0f}" if seconds >= 100 else f"{seconds:.2f}"


def table(out_dir):
    ours = load(out_dir, "ours")
    if ours is None:
        raise SystemExit(f"no ours.json in {out_dir}: run without --no-run-ours first")
    ours_runs = {(r["workload"], r["solver"]): r for r in ours["runs"] if "error" not in r}
    matrices = {key: np.load(r["scores"]) for key, r in ours_runs.items()}

    def reference_for(workload):
        # Ours-exact where it ran; on B ours-exact needs > 24 GB, so ours-CG stands in.
        if (workload, "exact") in matrices:
            return (workload, "exact")
        return (workload, "cg")

    lines = [
        "| library | solver | params | seconds | ratio (their time / ours) "
        "| Pearson vs ours-exact |",
        "|---|---|---|---|---|---|",
    ]
    details = []
    footnotes = []

    def add_row(label, run, workload, solver, reference_key, scores=None):
        ours_run = ours_runs.get((workload, solver))
        ref = matrices.get(reference_key)
        note = ""
        if reference_key[1] != "exact":
            note = " (vs ours-CG)"
        if scores is None:
            scores = run["factor"] * np.load(run["scores"])
        r = pearson(submatrix(ref, run), scores) if ref is not None else float("nan")
        ratio = run["seconds"] / ours_run["seconds"] if ours_run else float("nan")
        approx = "~" if run.get("timing", "").startswith("extrapolated") else ""
        lines.append(
            f"| {label} | {SOLVER_NAMES.get(solver, solver)} | {run['params']:,} | "
            f"{approx}{fmt_seconds(run['seconds'])} | "
            f"{'1' if label.startswith('tf_influence') else f'{approx}{ratio:,.1f}'} | "
            f"{r:.6f}{note} |"
        )
        if label.startswith("tf_influence"):
            return
        sub = submatrix(ref, run)
        rel = float(np.max(np.abs(sub - scores)) / np.max(np.abs(sub)))
        details.append(
            f"| {label} | {workload}-{solver} | {run['timing']} | {run['conversion']} | "
            f"{scores.shape[0]} x {scores.shape[1]} | {rel:.1e} | "
            f"{run['settings'].get('solver', '')} |"
        )

    for workload in ("A", "B"):
        ref_key = reference_for(workload)
        for solver in ("exact", "cg"):
            key = (workload, solver)
            if key in ours_runs:
                add_row("tf_influence", ours_runs[key], workload, solver, ref_key)
            for library, _, _, _, tag in EXTERNAL:
                if tag:
                    continue
                doc = load(out_dir, library)
                if doc is None:
                    continue
                if doc["status"] != "ok":
                    if workload == "A" and solver == "exact":
                        lines.append(
                            f"| {library} | - | - | - | - | {doc['status']}: {doc['reason']} |"
                        )
                    continue
                for run in doc["runs"]:
                    if (run["workload"], run["solver"]) != key:
                        continue
                    if "error" in run:
                        lines.append(
                            f"| {library} {doc['version']} | "
                            f"{SOLVER_NAMES.get(solver, solver)} | - | failed | - | "
                            f"{run['error'][:120]} |"
                        )
                        continue
                    add_row(f"{library} {doc['version']}", run, workload, solver, ref_key)
        lines.append("| | | | | | |")
    lines.pop()

    # Equal batches: ours and pyDVL's CG with 3 batches of 479.
    equal = ["", f"Equal batches ({EQUAL_BATCH} examples, 3 per pass), CG only:", "", *lines[:2]]
    ours_equal = load(out_dir, "ours" + EQUAL_TAG)
    pydvl_equal = load(out_dir, "pydvl" + EQUAL_TAG)
    for workload in ("A", "B"):
        ref_key = reference_for(workload)
        base = None
        for label, doc in (("tf_influence", ours_equal), ("pydvl", pydvl_equal)):
            if doc is None or doc["status"] != "ok":
                continue
            for run in doc["runs"]:
                if (run["workload"], run["solver"]) != (workload, "cg") or "error" in run:
                    continue
                scores = run["factor"] * np.load(run["scores"])
                sub = submatrix(matrices[ref_key], run)
                base = run["seconds"] if label == "tf_influence" else base
                approx = "~" if run.get("timing", "").startswith("extrapolated") else ""
                ratio = run["seconds"] / base if base else float("nan")
                name = label if label == "tf_influence" else f"pydvl {doc['version']}"
                suffix = "" if ref_key[1] == "exact" else " (vs ours-CG)"
                equal.append(
                    f"| {name} | CG | {run['params']:,} | {approx}{fmt_seconds(run['seconds'])} "
                    f"| {approx}{ratio:,.1f} | {pearson(sub, scores):.6f}{suffix} |"
                )
    if len(equal) > 5:
        lines.extend(equal)

    # pyDVL adds 2*l2 + damping to every diagonal entry (biases too): how much of its
    # deviation is that modelling difference, and how much numerics.
    for tag in ("", EQUAL_TAG):
        doc = load(out_dir, "pydvl" + tag)
        if doc is None or doc["status"] != "ok":
            continue
        for run in doc["runs"]:
            if "error" in run:
                continue
            key = (run["workload"], "exact-matched" if run["workload"] == "A" else "cg-matched")
            if key in matrices:
                scores = run["factor"] * np.load(run["scores"])
                sub = submatrix(matrices[key], run)
                rel = float(np.max(np.abs(sub - scores)) / np.max(np.abs(sub)))
                batch = run["settings"].get("batch_size")
                footnotes.append(
                    f"pyDVL {run['workload']}-{run['solver']} (batch {batch}) vs ours with the "
                    f"same uniform diagonal (L2 on biases too, ours-{key[1].split('-')[0]}): "
                    f"Pearson {pearson(sub, scores):.6f}, max abs diff / max abs {rel:.1e}"
                )
    return lines, details, footnotes, ours


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    work = Workload(args.workload)
    load_before = os.getloadavg()
    start = time.perf_counter()
    if args.run_ours:
        print("tf_influence (this process):", flush=True)
        run_ours(work, args.out, b_exact=args.ours_b_exact)
        run_ours(work, args.out, tag=EQUAL_TAG, batch_size=EQUAL_BATCH, only={"A-cg", "B-cg"})
    if args.run_external:
        run_external(args)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()
    info_path = os.path.join(args.out, "run_info.json")
    if args.run_ours and args.run_external:
        with open(info_path, "w") as handle:
            json.dump({"load": [load_before[0], load_after[0]], "seconds": elapsed}, handle)
    elif os.path.exists(info_path):  # the table of an earlier full run: its numbers
        with open(info_path) as handle:
            info = json.load(handle)
        (load_before, load_after), elapsed = [(x,) for x in info["load"]], info["seconds"]
    lines, details, footnotes, ours = table(args.out)
    report = [
        f"Workload: digits, n_train={work.n_train}, n_test={work.n_test}, l2={work.l2:g} on "
        f"kernels, damping={work.damping:g}; A = last layer, B = whole MLP. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{elapsed:.0f} s in all.",
        "",
        *lines,
        "",
        "`~`: extrapolated from a capped run (see details). B has no exact row: see README.",
        "",
        "| library | run | timing | conversion | sub-matrix compared | max abs diff / max abs "
        "ours | solver settings |",
        "|---|---|---|---|---|---|---|",
        *details,
        "",
        *[f"* {f}" for f in footnotes],
    ]
    text = "\n".join(report)
    print()
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text + "\n")


if __name__ == "__main__":
    main()
