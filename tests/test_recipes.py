from pathlib import Path

from cocord_fast import default_job
from cocord_fast.config import load_config
from cocord_fast.configs import ROOT, generate


def test_committed_recipes_are_the_generators_output():
    expected = generate.all_recipes()
    committed = {str(p.relative_to(ROOT)): p.read_text()
                 for folder in ("cifar100", "imagenet") for p in (ROOT / folder).glob("*.yaml")}
    assert committed == expected


def test_every_recipe_is_a_valid_config():
    for path in ROOT.glob("*/*.yaml"):
        cfg = load_config(path)  # raises on any unknown key or bad value
        assert cfg.train.output_dir.endswith(path.stem) or path.parent.name == "demo"


def test_all_published_pairs_have_every_method_with_the_crd_learning_rates():
    prefixes = [row.prefix for row in generate.method_recipes()]
    assert prefixes == ["kd", "dkd", "dist", "crd", "cocord", "cocord_kd"]
    for teacher, student in generate.CIFAR_PAIRS:
        for prefix in prefixes:
            cfg = load_config(ROOT / "cifar100" / f"{prefix}_{teacher}_{student}.yaml")
            assert (cfg.model.teacher, cfg.model.student) == (teacher, student)
            assert cfg.method.name == prefix.removesuffix("_kd")
            assert cfg.optim.lr == (0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
            assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.milestones) == (64, 240, [150, 180, 210])
            assert load_config(ROOT / "cifar100" / f"vanilla_{teacher}.yaml").model.student == teacher
        assert load_config(ROOT / "cifar100" / f"vanilla_{student}.yaml").method.name == "vanilla"
    assert load_config(ROOT / "cifar100" / "cocord_kd_vgg13_vgg8.yaml").cocord.loss_kd == 1.0
    assert load_config(ROOT / "cifar100" / "cocord_vgg13_vgg8.yaml").cocord.loss_kd == 0.0
    assert load_config(ROOT / "imagenet" / "cocord_resnet101_resnet50.yaml").cocord.queue_size == 16384


def recipe(folder: str, name: str):
    path = ROOT / folder / f"{name}.yaml"
    return load_config(path), path.read_text().splitlines()[:4]


def test_the_dkd_recipes_are_mdistillers():
    """mdistiller's configs/cifar100/dkd/: CE 1, alpha 1, T 4, warm-up 20, beta per pair (8
    where a config does not set it); ImageNet (configs/imagenet/r34_r18/dkd.yaml): beta 0.5,
    T 1, warm-up 1."""
    betas = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
             ("wrn_40_2", "wrn_16_2"): 6.0, ("vgg13", "MobileNetV2"): 6.0,
             ("resnet32x4", "resnet8x4"): 8.0, ("ResNet50", "MobileNetV2"): 8.0}
    for (teacher, student), beta in betas.items():
        cfg, _ = recipe("cifar100", f"dkd_{teacher}_{student}")
        assert (cfg.dkd.alpha, cfg.dkd.beta, cfg.dkd.temperature, cfg.dkd.loss_cls,
                cfg.dkd.warmup_epochs) == (1.0, beta, 4.0, 1.0, 20)
    cfg, header = recipe("cifar100", "dkd_resnet32x4_resnet8x4")
    assert "top-1 76.32" in " ".join(header)
    cfg, header = recipe("imagenet", "dkd_resnet34_resnet18")
    assert (cfg.dkd.beta, cfg.dkd.temperature, cfg.dkd.warmup_epochs) == (0.5, 1.0, 1)
    assert "71.70" in " ".join(header) and cfg.engine.name == "deepspeed"
    cfg, header = recipe("imagenet", "dkd_resnet101_resnet50")
    assert cfg.dkd.beta == 0.5 and "no published result" in " ".join(header)


def test_the_dist_recipes_are_the_authors():
    """dist_cifar.yaml: tau 4, beta = gamma = 1, CE 1 + 2 DIST; resnet_dist.yaml on ImageNet:
    tau 1, Nesterov."""
    for teacher, student in generate.CIFAR_PAIRS:
        cfg, _ = recipe("cifar100", f"dist_{teacher}_{student}")
        assert (cfg.dist.temperature, cfg.dist.beta, cfg.dist.gamma, cfg.dist.loss_cls,
                cfg.dist.loss_dist, cfg.optim.nesterov) == (4.0, 1.0, 1.0, 1.0, 2.0, False)
    cfg, header = recipe("cifar100", "dist_resnet32x4_ShuffleV2")
    assert "top-1 77.35" in " ".join(header) and cfg.optim.lr == 0.01
    cfg, header = recipe("imagenet", "dist_resnet34_resnet18")
    assert (cfg.dist.temperature, cfg.dist.loss_dist, cfg.optim.nesterov) == (1.0, 2.0, True)
    assert "72.07" in " ".join(header) and cfg.optim.lr == 0.1


def test_the_pretrained_teacher_recipes_name_library_weights_instead_of_a_file():
    for label, (teacher, weights, *_) in generate.PRETRAINED_TEACHERS.items():
        cfg = load_config(ROOT / "imagenet" / f"cocord_{label}_resnet18.yaml")
        assert (cfg.model.teacher, cfg.model.teacher_weights) == (teacher, weights)
        assert cfg.model.teacher_checkpoint == "" and cfg.model.student == "resnet18"


def test_the_default_job_runs_the_stages_the_readme_lists():
    """The README's table of the default job: stage, recipe, model and epochs, in order."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")]
            for line in readme.splitlines()
            if line.startswith("| `") and "configs/demo/" in line]
    assert [(stage, recipe) for stage, recipe, *_ in rows] == [
        (stage, f"configs/demo/{recipe}") for stage, recipe in default_job.STAGES]
    for _, recipe, model, epochs, *_ in rows:
        cfg = load_config(ROOT.parent / recipe)
        assert (cfg.model.student, cfg.train.epochs) == (model, int(epochs)), recipe
    teacher = load_config(ROOT / "demo" / "teacher.yaml")
    for _, recipe in default_job.STAGES[1:]:  # every student distils the teacher the job trains
        cfg = load_config(ROOT / "demo" / recipe)
        assert cfg.model.teacher_checkpoint == f"{teacher.train.output_dir}/last.pt"
        assert cfg.model.teacher == teacher.model.student
