"""Data curation: raw text in, a filtered, deduplicated, decontaminated corpus out.

    cfg = settings.load("curate.toml")           # sources, rules, dedup, decontamination, output
    report = pipeline.curate(cfg, "curated/")    # curated/data/part-*.jsonl, report.json, ...

Modules, one job each: textstats (text split the ways rules read it), rules (Gopher, C4,
FineWeb heuristics), langid (py3langid), quality (a DCLM-style classifier), decontam (13-gram
overlap with evaluation sets), minhash and dedup (exact + MinHash LSH, union-find, deterministic
survivor), records (input with provenance, output shards), report, settings (the config file),
docfilter (the per-file stage every engine runs), staging (OUT.partial and resuming), pipeline
(one run on engine 'local', a process pool, or 'ray': ray_engine.py, with cluster_stages.py
and components.py doing the work of its tasks).
`mai-jax data curate` is the command line.

Like the rest of mai_jax.data this imports nothing from mai_jax.model or mai_jax.train.
"""
