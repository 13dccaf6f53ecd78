rule evaluate:
    """Test-split scores, confusion matrix and learning curves, in one process."""
    input:
        model=TRAIN_OUTPUT["model"],
        log_csv=TRAIN_OUTPUT["log_csv"],
        test=rules.prepare.output.test,
    output:
        metrics="results/runs/{run}/eval/metrics.json",
        per_class="results/runs/{run}/eval/per_class.csv",
        confusion_csv="results/runs/{run}/eval/confusion_matrix.csv",
        confusion=report(
            "results/runs/{run}/eval/confusion_matrix.png",
            caption="../report/confusion_matrix.rst",
            category="Evaluation",
            subcategory="{run}",
        ),
        curves=report(
            "results/runs/{run}/eval/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Training",
            subcategory="{run}",
        ),
    log:
        "results/logs/evaluate/{run}.log",
    benchmark:
        "results/benchmarks/evaluate/{run}.tsv"
    conda:
        software_env("torch")
    envmodules:
        *ENV_MODULES,
    threads: 2
    resources:
        cpus_per_task=lambda wildcards, threads: threads,
        mem_mb=3000,
        runtime=15,
    params:
        code=code_digest("mnistflow.evaluate"),
        packages=versions_imported_by("mnistflow.evaluate"),
        batch_size=config["evaluate"]["batch_size"],
    shell:
        "python -m mnistflow.evaluate --model {input.model} --test-data {input.test}"
        " --train-log {input.log_csv} --metrics {output.metrics} --per-class {output.per_class}"
        " --confusion-csv {output.confusion_csv} --confusion-png {output.confusion}"
        " --curves-png {output.curves} --batch-size {params.batch_size} --threads {threads} > {log} 2>&1"
