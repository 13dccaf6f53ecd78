localrules:
    environment,


rule environment:
    """Record what the training environment holds; training depends on the record.
    A local rule: it reads package metadata in a tenth of a second, in the same conda
    environment or modules as the training jobs.
    """
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
    params:
        code=code_digest("mnistflow.envinfo"),
        # Without --sdm conda the rules run in Snakemake's own environment: a changed
        # version of a package training imports reruns the record, and with it training.
        packages=versions_imported_by("mnistflow.train"),
    shell:
        "python -m mnistflow.envinfo --out {output} > {log} 2>&1"
