"""The markdown report of one benchmark run, with each target checked against it."""

from __future__ import annotations


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def render(r: dict) -> str:
    m = r["machine"]
    out = [
        "# ImageFinder benchmark",
        "",
        f"`{r['command'].strip()}` - {r['started']}, {r.get('seconds', 0) / 60:.1f} min. "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, AVX-512 BF16 "
        f"{'yes' if m['avx512_bf16'] else 'no'}, VNNI {'yes' if m['avx512_vnni'] else 'no'}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Load average at start {fmt_load(r['load_average_at_start'])}, at end "
        f"{fmt_load(r['load_average_at_end'])} (above ~0.5 means other work shared the cores).",
        "",
    ]
    checks = targets(r)
    if checks:
        out += ["## Targets", "", table(["target", "measured", "met"], checks), ""]
    if "indexing" in r:
        out += indexing_section(r["indexing"])
    if r.get("sweep"):
        out += [
            "### Pipeline settings sweep (large photos, ResNet50 fp32)",
            "",
            table(
                ["batch size", "decode workers", "torch threads", "decoding", "images/s"],
                [
                    [
                        s["batch_size"],
                        s["workers"],
                        s["threads"],
                        "beside inference" if s.get("overlap") else "between batches",
                        s["images_per_s"],
                    ]
                    for s in r["sweep"]
                ],
            ),
            "",
        ]
    if "quality" in r:
        out += quality_section(r["quality"])
    if "search" in r:
        out += search_section(r["search"])
    if "knn" in r:
        out += knn_section(r["knn"])
    return "\n".join(out)


def fmt_load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def indexing_section(ix: dict) -> list[str]:
    s = ix["settings"]
    out = [
        "## 1. Indexing throughput (files to committed rows)",
        "",
        f"imagefinder = `index_folder` with the `extract` defaults (batch {s['batch_size']}, "
        f"{s['workers']} decode workers, decoding "
        f"{'beside inference' if s.get('overlap') else 'between batches'}); naive reference = per image a full PIL decode, "
        "`Resize((224, 224))`, a batch-1 forward, an insert and a commit. ResNet50 runs a "
        "random state dict (time only). Each pipeline in its own process; peak RSS is that "
        "process's.",
        "",
    ]
    corpora = list(dict.fromkeys(row["corpus"] for row in ix["rows"]))
    for corpus in corpora:
        rows = [row for row in ix["rows"] if row["corpus"] == corpus]
        out += [
            f"### {corpus}",
            "",
            table(
                [
                    "model",
                    "pipeline",
                    "precision",
                    "images/s",
                    "x naive",
                    "x forward-only",
                    "peak RSS MB",
                ],
                [
                    [
                        row["model"],
                        row["pipeline"],
                        row["precision"],
                        row["images_per_s"],
                        row["vs_naive"],
                        row.get("vs_forward_only", "-"),
                        round(row["peak_rss_mb"]),
                    ]
                    for row in rows
                ],
            ),
            "",
        ]
    out += [
        "### Forward pass alone (ready tensors, best batch size)",
        "",
        table(
            [
                "model",
                "precision",
                "best batch",
                "images/s",
                "per batch size",
                "model load/convert s",
            ],
            [
                [
                    f["model"],
                    f["precision"],
                    f["best_batch"],
                    f["images_per_s"],
                    ", ".join(f"{b}: {v:.1f}" for b, v in f["per_batch"].items()),
                    f["prepare_seconds"] if f["prepare_seconds"] is not None else "-",
                ]
                for f in ix["forward"]
            ],
        ),
        "",
    ]
    return out


def quality_section(q: dict) -> list[str]:
    rows = []
    for label, e in q.items():
        rows.append(
            [
                label,
                e["precision_at_3"],
                e["map"],
                fmt(e.get("cosine_to_fp32_mean")),
                fmt(e.get("cosine_to_fp32_min")),
                fmt(e.get("precision_at_3_fp32_queries")),
                fmt(e.get("recall_at_3_vs_exact")),
            ]
        )
    return [
        "## 2. Retrieval quality (efficientnet-lite0, Caltech, leave-one-out)",
        "",
        "Each index was written by the run above. `fp32 queries`: precision@3 when the "
        "fp32 vectors (what a default server computes for an upload) search that index.",
        "",
        table(
            [
                "index",
                "precision@3",
                "mAP",
                "cosine to fp32 (mean)",
                "(min)",
                "precision@3, fp32 queries",
                "recall@3 vs exact KNN",
            ],
            rows,
        ),
        "",
    ]


def fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def search_section(s: dict) -> list[str]:
    ip = s["in_process"]
    rows = [
        [
            "in-process: decode 12 MP JPEG (draft) + preprocess",
            ip["decode"]["p50_ms"],
            ip["decode"]["p95_ms"],
            "-",
        ],
        [
            "in-process: decode + one forward (batch 1)",
            ip["decode_plus_forward"]["p50_ms"],
            ip["decode_plus_forward"]["p95_ms"],
            "-",
        ],
        [
            "API, 1 client",
            s["api_1_client"]["p50_ms"],
            s["api_1_client"]["p95_ms"],
            s["api_1_client"]["throughput_per_s"],
        ],
        [
            "API, 8 concurrent clients",
            s["api_8_clients"]["p50_ms"],
            s["api_8_clients"]["p95_ms"],
            s["api_8_clients"]["throughput_per_s"],
        ],
        [
            "GET /health while 8 clients search",
            s["health_during_8_clients"]["p50_ms"],
            s["health_during_8_clients"]["p95_ms"],
            "-",
        ],
    ]
    return [
        "## 3. Search latency (ResNet50 fp32, uvicorn on 127.0.0.1, "
        f"{s['photo_bytes'] / 1e6:.2f} MB 12 MP JPEG upload)",
        "",
        table(["what", "p50 ms", "p95 ms", "searches/s"], rows),
        "",
        f"API p50 / in-process p50 = {s['api_p50_vs_in_process']:.2f}. Server RSS: "
        f"{s['server_rss_mb_after_load']:.0f} MB after load, "
        f"{s['server_rss_mb_after_searches']:.0f} MB after the searches.",
        "",
    ]


def knn_section(rows: list[dict]) -> list[str]:
    return [
        "## 4. KNN latency, k=3, synthetic 2048-d unit vectors (CNN-like, clustered)",
        "",
        table(
            [
                "N",
                "method",
                "p50 ms",
                "p95 ms",
                "recall@3",
                "default SQLite mode",
                "index build s",
                "index MB",
            ],
            [
                [
                    f"{r['n']:,}",
                    r["method"],
                    r["p50_ms"],
                    r["p95_ms"],
                    r["recall_at_3"],
                    r["default_mode"],
                    r["build_seconds"],
                    round(r["db_mb"]),
                ]
                for r in rows
            ],
        ),
        "",
    ]


def targets(r: dict) -> list[list]:
    checks = []

    def add(name, measured, ok):
        checks.append([name, measured, "yes" if ok else "**no**"])

    ix = r.get("indexing")
    if ix:
        large = [row for row in ix["rows"] if row["corpus"].startswith("large")]
        fp32 = next(
            (
                x
                for x in large
                if x["model"] == "resnet50"
                and x["pipeline"] == "imagefinder"
                and x["precision"] == "fp32"
            ),
            None,
        )
        if fp32:
            add(
                "large photos, ResNet50 fp32: >= 2x naive",
                f"{fp32['vs_naive']:.2f}x",
                fp32["vs_naive"] >= 2,
            )
            add(
                "... and >= 0.85 of forward-only at its best batch",
                f"{fp32['vs_forward_only']:.2f}",
                fp32["vs_forward_only"] >= 0.85,
            )
        fast = [
            x
            for x in large
            if x["model"] == "resnet50"
            and x["pipeline"] == "imagefinder"
            and x["precision"] != "fp32"
        ]
        if fast:
            best = max(fast, key=lambda x: x["vs_naive"])
            add(
                "fastest opt-in mode: >= 4x naive",
                f"{best['precision']}: {best['vs_naive']:.2f}x",
                best["vs_naive"] >= 4,
            )
    q = r.get("quality")
    if q and "naive" in q and "fp32" in q:
        d = q["fp32"]["precision_at_3"] - q["naive"]["precision_at_3"]
        add("fp32 precision@3 within 0.01 of naive (or better)", f"{d:+.4f}", d >= -0.01)
        for label in q:
            if label not in ("naive", "fp32") and not label.startswith("fp32,"):
                d = q[label]["precision_at_3"] - q["fp32"]["precision_at_3"]
                add(f"{label} precision@3 within 0.01 of fp32", f"{d:+.4f}", d >= -0.01)
    s = r.get("search")
    if s:
        add(
            "API p50 <= 1.3x in-process decode + forward",
            f"{s['api_p50_vs_in_process']:.2f}x",
            s["api_p50_vs_in_process"] <= 1.3,
        )
        one, eight = s["api_1_client"]["throughput_per_s"], s["api_8_clients"]["throughput_per_s"]
        add("8 clients: throughput >= 1 client's", f"{eight:.2f} vs {one:.2f} /s", eight >= one)
        h = s["health_during_8_clients"]["p95_ms"]
        add("/health p95 while 8 clients search < 100 ms", f"{h:.1f} ms", h < 100)
    rows = r.get("knn") or []
    big = [x for x in rows if x["n"] == 100_000]
    fast = next((x for x in big if "ivf" in x["method"]), None)
    faiss = next((x for x in big if "faiss" in x["method"]), None)
    if fast:
        add(
            "KNN N=100k: p50 <= 40 ms through SQL", f"{fast['p50_ms']:.1f} ms", fast["p50_ms"] <= 40
        )
        add("... with recall@3 >= 0.99", f"{fast['recall_at_3']:.3f}", fast["recall_at_3"] >= 0.99)
        if faiss:
            add(
                "... and at most half of faiss flat's p50",
                f"{fast['p50_ms'] / faiss['p50_ms']:.2f}x faiss",
                fast["p50_ms"] <= faiss["p50_ms"] / 2,
            )
    return checks
