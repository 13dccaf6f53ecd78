rule environment:
    """Record what the training environment holds; training depends on the record."""
    output:
        "results/env/train_env.json",
    log:
        "results/logs/environment.log",
    benchmark:
        "results/benchmarks/environment.tsv"
    conda:
        software_env("torch")
    envmodules:
        *ENV_MODULES,
    resources:
        runtime=10,
        mem_mb=2000,
        cpus_per_task=1,
    params:
        code=code_digest("mnistflow.envinfo"),
        # Without --sdm conda the rules run in Snakemake's own environment: a changed
        # package version there reruns the record, and with it training.
        packages=package_versions(),
    shell:
        "python -m mnistflow.envinfo --out {output} > {log} 2>&1"
