localrules:
    download,
    prepare,


rule download:
    """The four IDX files, from the first mirror that serves them with the right MD5.
    A local rule: on a cluster it runs on the submit host, as compute nodes often have no internet.
    """
    output:
        expand("{data}/raw/{file}", data=DATA, file=FILES),
    log:
        "results/logs/download.log",
    benchmark:
        "results/benchmarks/download.tsv"
    conda:
        software_env("torch")
    envmodules:
        *ENV_MODULES,
    params:
        dataset=config["dataset"]["name"],
        out=lambda wildcards, output: directory_of(output),
        md5=json.dumps(config["dataset"]["md5"], sort_keys=True),
    shell:
        "python -m mnistflow.data download --dataset {params.dataset} --md5 {params.md5:q}"
        " --out {params.out} > {log} 2>&1"


rule prepare:
    """One array file per split, so training reads a whole split in one go.
    A local rule: it takes under a second, less than a Slurm job's submission and polling.
    """
    input:
        rules.download.output,
    output:
        train=f"{DATA}/train.npz",
        test=f"{DATA}/test.npz",
    log:
        "results/logs/prepare.log",
    benchmark:
        "results/benchmarks/prepare.tsv"
    conda:
        software_env("torch")
    envmodules:
        *ENV_MODULES,
    params:
        code=code_digest("mnistflow.data"),
        packages=versions_imported_by("mnistflow.data"),
        raw=lambda wildcards, input: directory_of(input),
    shell:
        "python -m mnistflow.data prepare --raw {params.raw}"
        " --train {output.train} --test {output.test} > {log} 2>&1"
