localrules:
    summarize,


rule summarize:
    """The runs side by side: tables, provenance, per-class scores, charts, the sweeps."""
    input:
        records=expand("results/runs/{run}/train.json", run=RUNS),
        metrics=expand("results/runs/{run}/eval/metrics.json", run=RUNS),
    output:
        csv="results/summary/runs.csv",
        # each training job's grant and use, from sacct (header only off Slurm)
        slurm_usage="results/summary/slurm_usage.csv",
        markdown=report(
            "results/summary/runs.md",
            caption="../report/summary.rst",
            category="Summary",
        ),
        chart=report(
            "results/summary/runs.png",
            caption="../report/summary.rst",
            category="Summary",
        ),
        page=report(
            "results/summary/runs.html",
            caption="../report/runs_page.rst",
            category="Summary",
        ),
        sweeps=report(
            "results/summary/sweeps.png",
            caption="../report/sweeps.rst",
            category="Summary",
        ),
    log:
        "results/logs/summarize.log",
    conda:
        software_env("report")
    envmodules:
        *ENV_MODULES,
    params:
        code=code_digest("mnistflow.summarize"),
        packages=versions_imported_by("mnistflow.summarize"),
        sweeps=json.dumps(
            {name: {"grid": spec["grid"]} for name, spec in config["sweeps"].items()}
        ),
    shell:
        "python -m mnistflow.summarize --records {input.records} --metrics {input.metrics}"
        " --csv {output.csv} --slurm-usage {output.slurm_usage} --markdown {output.markdown}"
        " --chart {output.chart} --page {output.page} --sweeps-chart {output.sweeps}"
        " --sweeps {params.sweeps:q} > {log} 2>&1"
