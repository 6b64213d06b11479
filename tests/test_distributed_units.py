"""Issue 9, the pure parts of the multi-GPU path: per-rank slices, strategy choice, launch refusals, resume guard,
and the planner's answer when one card is not enough. No process group, no model: well under a second each."""

from __future__ import annotations

import json

import pytest

from onecard.errors import UserError
from onecard.recipe import validate_recipe
from onecard.train.distributed import choose_strategy, quant_storage_kwargs, rank_slices
from onecard.train.launch import launch_command


def recipe(**training):
    tree = {"model": {"name_or_path": "llama-3-8b"}, "method": training.pop("method", "lora"),
            "training": training}
    return validate_recipe(tree)


@pytest.mark.parametrize("micro_batch,world,accum,n", [(2, 2, 2, 8), (1, 2, 4, 8), (3, 2, 2, 12), (2, 3, 1, 6)])
def test_ranks_together_take_exactly_the_one_gpu_window(micro_batch, world, accum, n):
    """1 GPU x micro-batch (mb x world) x accum == world GPUs x micro-batch mb x accum: per accumulation step, the
    ranks' slices are a partition of the one-GPU micro-batch."""
    window = list(range(100, 100 + n))
    one_gpu = [window[i:i + micro_batch * world] for i in range(0, n, micro_batch * world)]
    per_rank = [rank_slices(window, micro_batch, world, r) for r in range(world)]
    assert all(len(s) == accum for s in per_rank)
    for k, big in enumerate(one_gpu):
        pieces = [per_rank[r][k] for r in range(world)]
        assert all(len(p) == micro_batch for p in pieces)
        assert [i for p in pieces for i in p] == big


def test_short_last_window_leaves_a_rank_a_zero_weight_pass():
    # 5 examples left at the epoch's end, micro-batch 2 on 2 ranks: sets [0..3] and [4]
    assert rank_slices([0, 1, 2, 3, 4], 2, 2, 0) == [[0, 1], [4]]
    assert rank_slices([0, 1, 2, 3, 4], 2, 2, 1) == [[2, 3], None]


def test_strategy_ddp_when_one_card_holds_it_fsdp_otherwise():
    assert choose_strategy(recipe()) == "ddp"  # 8B LoRA on the default plan.gpu (rtx4090) fits
    assert choose_strategy(recipe(method="full")) == "fsdp"
    big = validate_recipe({"model": {"name_or_path": "llama-3-70b"}, "method": "qlora"})
    assert choose_strategy(big) == "fsdp"  # 70B NF4 alone is ~35 GB: not on 24 GB
    assert choose_strategy(big, "ddp") == "ddp"  # explicit wins
    with pytest.raises(UserError, match="unknown strategy"):
        choose_strategy(big, "zero3")


def test_launch_command_reexecs_the_same_train_under_torchrun(tmp_path):
    cmd = launch_command(tmp_path / "r.yaml", ["training.seed=3"], 2, ["--resume"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    tail = cmd[cmd.index("--module") + 1:]
    assert tail[:3] == ["onecard.cli", "train", str(tmp_path / "r.yaml")]
    assert "training.seed=3" in tail and "training.num_gpus=2" in tail and tail[-1] == "--resume"


def test_quant_storage_only_inside_an_fsdp_worker(monkeypatch):
    monkeypatch.setenv("ONECARD_DISTRIBUTED_STRATEGY", "fsdp")
    assert quant_storage_kwargs() == {}  # not a torchrun worker
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    import torch

    assert quant_storage_kwargs() == {"bnb_4bit_quant_storage": torch.bfloat16}
    monkeypatch.setenv("ONECARD_DISTRIBUTED_STRATEGY", "ddp")
    assert quant_storage_kwargs() == {}


def test_launch_refusals():
    from onecard.train.launch import check_launchable

    check_launchable(validate_recipe({"model": {"name_or_path": "x"}, "task": "dpo"}), 2, cpu=True)  # runs on N
    with pytest.raises(UserError, match="1 example per step"):
        check_launchable(validate_recipe({"model": {"name_or_path": "x"}, "task": "kto", "training": {
            "micro_batch_size": 1, "grad_accum": 1}}), 1, cpu=True)
    with pytest.raises(UserError, match="single-GPU optimizer"):
        check_launchable(recipe(method="full", optimizer="adamw_cpu_offload"), 2, cpu=True)
    import torch

    if torch.cuda.device_count() < 64:
        with pytest.raises(UserError, match="64 GPUs asked for"):
            check_launchable(recipe(), 64, cpu=False)


def test_a_reference_copy_is_refused_under_fsdp_only():
    """Full fine-tuning's DPO reference is a frozen copy of the model: FSDP would shard the policy only."""
    from onecard.train.distributed import check_strategy

    full_dpo = validate_recipe({"model": {"name_or_path": "x"}, "task": "dpo", "method": "full"})
    check_strategy(full_dpo, "ddp")
    with pytest.raises(UserError, match="whole on every GPU") as exc:
        check_strategy(full_dpo, "fsdp")
    assert exc.value.where == "preference.reference" and "--strategy ddp" in exc.value.fix
    check_strategy(validate_recipe({"model": {"name_or_path": "x"}, "task": "kto"}), "fsdp")  # LoRA: no copy


def test_resume_refused_on_a_different_number_of_processes(tmp_path):
    from onecard.train.checkpoint import check_resume_world

    step = tmp_path / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    check_resume_world(tmp_path, 1)  # a one-GPU checkpoint has no ranks directory
    with pytest.raises(UserError, match="written by 1 process"):
        check_resume_world(tmp_path, 2)
    ranks = tmp_path / "checkpoints" / "ranks-step-4"
    ranks.mkdir()
    (ranks / "world.json").write_text(json.dumps({"world_size": 2}))
    check_resume_world(tmp_path, 2)
    with pytest.raises(UserError, match="--num-gpus 2"):
        check_resume_world(tmp_path, 1)


def test_cli_num_gpus_without_gpus_is_a_clean_user_error(tmp_path, capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    from onecard.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"name_or_path": str(tmp_path)}, "output_dir": str(tmp_path / "run")}))
    with pytest.raises(SystemExit) as exc:
        main(["train", str(path), "--num-gpus", "2"])
    assert exc.value.code == 2
    assert "2 GPUs asked for" in capsys.readouterr().err


def test_gpu_counts_are_proposed_once_each_gpu_loads_only_its_shards():
    """70B QLoRA: with FSDP2's low-memory loading a GPU holds its shards plus one whole tensor while the model loads
    (about half a 4090 at 4 GPUs) instead of the whole NF4 model (~36 GiB), so the sharded step decides how
    many 4090s are proposed, and a plan for several GPUs prints its load per GPU."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import suggest_fixes

    r = validate_recipe({"model": {"name_or_path": "llama-3-70b"}, "method": "qlora", "plan": {"gpu": "rtx4090"}})
    proposed = [s for s in suggest_fixes(plan_memory(inputs_from_recipe(r))) if "training.num_gpus" in s.set]
    assert len(proposed) == 1
    chosen = plan_memory(inputs_from_recipe(r).with_(num_gpus=proposed[0].set["training.num_gpus"]))
    assert chosen.fits and chosen.load_bytes < chosen.capacity_bytes
    four = plan_memory(inputs_from_recipe(r).with_(num_gpus=4))
    assert four.load_bytes < 0.6 * four.capacity_bytes and any(n.startswith("loading: ") for n in four.notes)
    assert plan_memory(inputs_from_recipe(r).with_(num_gpus=2, gpu=__import__("onecard.catalog.gpus",
                                                   fromlist=["GPUS"]).GPUS["h100-sxm"])).fits


@pytest.mark.parametrize("model,method,gpu", [("llama-3-8b", "full", "rtx4090")])
def test_planner_names_the_gpu_count_that_fits(model, method, gpu):
    """When a recipe does not fit one card, the suggestions include N x the same card, re-planned per GPU.
    (Full SFT of 8B at micro-batch 1 fits one 80 GB H100 by the plan, 63.9 GiB: bf16 AdamW state; so the 24 GB card.)"""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import suggest_fixes

    r = validate_recipe({"model": {"name_or_path": model}, "method": method, "plan": {"gpu": gpu}})
    plan = plan_memory(inputs_from_recipe(r))
    assert plan.verdict == "does not fit"
    multi = [s for s in suggest_fixes(plan) if "training.num_gpus" in s.set]
    assert len(multi) == 1 and multi[0].verdict != "does not fit"
    n = multi[0].set["training.num_gpus"]
    assert not plan_memory(inputs_from_recipe(r).with_(num_gpus=n - 1)).fits or n == 2  # the smallest that fits
    assert plan_memory(inputs_from_recipe(r).with_(num_gpus=n)).fits


# --------------------------------------------------------------------------- gradient clipping under FSDP


class _TinyLM:
    """A causal LM of three layers (embedding, frozen linear, head) with an FSDP-root-like ``clip_grad_norm_``
    that records its calls: FSDP1's root all-reduces the norm over shards there."""

    def __new__(cls):
        import torch

        class TinyLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.emb, self.frozen, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 16)
                self.frozen.requires_grad_(False)
                self.root_clips: list[float] = []

            def forward(self, input_ids, attention_mask=None, use_cache=None):
                from types import SimpleNamespace

                return SimpleNamespace(logits=self.head(self.frozen(self.emb(input_ids))))

            def clip_grad_norm_(self, max_norm, norm_type=2.0):
                self.root_clips.append(max_norm)
                grads = [p for p in self.parameters() if p.grad is not None]
                return torch.nn.utils.clip_grad_norm_(grads, max_norm, norm_type)

        return TinyLM()


class _FakeAccelerator:
    """What a RankStep uses of accelerate.Accelerator, one process; records the parameters handed to
    ``clip_grad_norm_`` (which, for a subset under FSDP, clips each rank by its own shard's norm)."""

    num_processes, process_index, is_main_process, device = 1, 0, True, "cpu"

    def __init__(self):
        self.clipped_with: list[list] = []

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        import torch

        params = list(parameters)
        self.clipped_with.append(params)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def no_sync(self, model):
        import contextlib

        return contextlib.nullcontext()


def _one_step(strategy: str):
    import torch

    from types import SimpleNamespace

    from onecard.train.distributed import Dist
    from onecard.train.rank_step import RankStep
    from onecard.train.spine import optimizer_step

    class OneProcess(Dist):
        def all_sum(self, values):
            return list(values)

    model, accelerator = _TinyLM(), _FakeAccelerator()
    dist = OneProcess(accelerator, strategy, "cpu")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    dataset = SimpleNamespace(examples=[{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}])
    step = RankStep(model, optimizer, recipe(max_grad_norm=0.5), dist, dataset, 0, fused_loss=False)
    record = optimizer_step(step, [[0]], 3, 10)
    return model, accelerator, record


def test_fsdp_clips_by_the_norm_over_all_shards():
    """Under FSDP the loop hands accelerate *all* parameters: only then does accelerate 1.16 take its FSDP route
    (the DTensor-aware norm over every rank's shards); the trainable subset made each rank clip by its own shard's
    norm under FSDP1 (the 2.6% parity drift on 2 x H200)."""
    model, accelerator, record = _one_step("fsdp")
    [params] = accelerator.clipped_with
    assert len(params) == len(list(model.parameters())) and all(a is b for a, b in zip(params, model.parameters()))
    assert record["grad_norm"] is not None and record["grad_norm"] > 0


def test_ddp_clips_the_trainable_parameters_through_accelerate():
    model, accelerator, record = _one_step("ddp")
    assert model.root_clips == []
    [params] = accelerator.clipped_with
    trainable = [p for p in model.parameters() if p.requires_grad]  # embedding, head weight and bias
    assert len(params) == len(trainable) == 3 and all(a is b for a, b in zip(params, trainable))
    assert record["grad_norm"] is not None


def test_accelerate_routes_to_fsdp_clipping_only_for_all_parameters():
    """The accelerate behaviour Dist.clip_grad_norm_ relies on (accelerate 1.16 Accelerator.clip_grad_norm_): under
    FSDP2 the DTensor-aware norm (all-reduced over the shards) for list(model.parameters()) -- and, in 1.16, for a
    subset too, through its fall-through; onecard passes all parameters, the route that does not depend on that.
    If this starts failing, accelerate changed its routing and Dist.clip_grad_norm_ should be re-read."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    model = _TinyLM()
    aware = []
    fake = SimpleNamespace(distributed_type=DistributedType.FSDP, _models=[model], is_fsdp2=True,
                           unscale_gradients=lambda: None,
                           _clip_grad_norm_dtensor_aware=lambda params, max_norm, norm_type=2: aware.append(params))
    Accelerator.clip_grad_norm_(fake, list(model.parameters()), 1.0)
    assert len(aware) == 1  # all parameters: the FSDP2 route
    Accelerator.clip_grad_norm_(fake, [p for p in model.parameters() if p.requires_grad], 1.0)
    assert len(aware) == 2 and model.root_clips == []  # the subset: DTensor-aware as well, never FSDP1's root


# --------------------------------------------------------------------------- worker environment


def test_worker_environment_carries_strategy_and_source_and_leaves_the_allocator_alone():
    from onecard.train.distributed import CPU_ENV, STRATEGY_ENV
    from onecard.train.launch import launch_env

    env = launch_env("fsdp", cpu=False, base={"PATH": "/bin"})
    assert env[STRATEGY_ENV] == "fsdp" and CPU_ENV not in env and env["PATH"] == "/bin"
    assert env["PYTHONPATH"].split(":")[0].endswith("src")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env  # measured worse under FSDP (launch_env's docstring)
    mine = launch_env("ddp", cpu=False, base={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"  # the user's setting passes through
    cpu = launch_env("ddp", cpu=True, base={})
    assert cpu[CPU_ENV] == "1" and cpu["OMP_NUM_THREADS"] == "1"


def test_probe_compares_ddp_ranks_with_the_one_gpu_plan_and_fsdp_with_the_split():
    from onecard.bench.distributed_probe import plan_prediction

    r = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": "lora",
                         "training": {"num_gpus": 2}, "plan": {"gpu": "h200"}})
    ddp, fsdp = plan_prediction(r, "ddp"), plan_prediction(r, "fsdp")
    assert ddp["planned_num_gpus"] == 1 and fsdp["planned_num_gpus"] == 2
    assert fsdp["predicted_weights_gib"] == pytest.approx(ddp["predicted_weights_gib"] / 2, rel=0.01)


def test_docs_multigpu_section_is_the_committed_2gpu_rows():
    """docs/benchmarks.json's multi-GPU section is generated from bench/results/h200x2-*.jsonl, and those rows never
    reach the single-GPU tables or the calibration (no ``device: cuda``)."""
    from pathlib import Path

    from onecard.bench.calibrate import load_records, measurement_rows
    from onecard.bench.report_multigpu import multigpu_section

    records = load_records()
    section = multigpu_section(records)
    doc = json.loads((Path(__file__).resolve().parents[1] / "docs" / "benchmarks.json").read_text())
    assert json.loads(json.dumps(section)) == doc["multigpu"]
    rows = [r for r in records if r.get("group") == "multigpu"]
    assert rows and not any(r.get("device") for r in rows)
    assert not any("multigpu" in row["source"] for row in measurement_rows(records))
    for s in section["speedup"]:
        assert s["pass"] == (s["tokens_per_s_2gpus"] / s["tokens_per_s_1gpu"] >= 1.8)


def test_fsdp_runs_without_kernels_and_says_so(monkeypatch):
    """Under FSDP the fused LoRA ops would read sharded adapter weights: no kernels, one notice; DDP keeps them."""
    from rich.console import Console

    import onecard.train.distributed_loop as distributed_loop
    from onecard.train.distributed import Dist
    from onecard.train.distributed_loop import FSDP_KERNELS_NOTICE, kernels_for_strategy
    from onecard.train.sft import AppliedKernels

    applied = []
    monkeypatch.setattr(distributed_loop, "apply_recipe_kernels",
                        lambda *a, **k: applied.append(a) or AppliedKernels("onecard", True))
    r = recipe()
    console = Console(record=True, width=400)
    fsdp = kernels_for_strategy(Dist(None, "fsdp", "cuda:0"), object(), r, console)
    assert fsdp.name == "none" and not fsdp.fused_loss and not applied
    assert FSDP_KERNELS_NOTICE[:40] in console.export_text()
    ddp = kernels_for_strategy(Dist(None, "ddp", "cuda:0"), object(), r, console)
    assert ddp.name == "onecard" and len(applied) == 1


def test_dora_is_no_longer_refused_under_fsdp2():
    """FSDP1 refused DoRA (peft read lora_A outside its unit); FSDP2's layer units hold it whole
    (tests/test_distributed_fsdp.py trains it on 2 CPU processes)."""
    from onecard.train.distributed import check_strategy

    check_strategy(recipe(method="dora"), "fsdp")
    check_strategy(recipe(method="lora"), "fsdp")


def test_counting_job_is_a_loadable_model_and_the_rows_asked_for(tmp_path):
    """The multi-GPU checks' shared job (onecard.tiny.save_counting_job): a model transformers loads back and one
    chat row per example, counting to i % 13."""
    import json

    from transformers import AutoConfig

    from onecard.tiny import save_counting_job

    model, chat = save_counting_job(tmp_path, 27)
    assert AutoConfig.from_pretrained(model).num_hidden_layers == 4
    rows = [json.loads(line) for line in chat.read_text().splitlines()]
    assert len(rows) == 27 and rows[14]["messages"][1]["content"] == "0 1 done"


def test_planner_may_propose_a_gpu_count_for_dora_under_fsdp2():
    """The planner agrees with train, which runs DoRA under FSDP2: N x the card is proposed like for LoRA."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory
    from onecard.plan.suggest import suggest_fixes

    r = validate_recipe({"model": {"name_or_path": "llama-3-8b"}, "method": "dora", "plan": {"gpu": "rtx4090"},
                         "training": {"micro_batch_size": 8}})
    plan = plan_memory(inputs_from_recipe(r))
    assert plan.verdict == "does not fit"
    assert not any("DoRA does not run" in n for n in plan_memory(inputs_from_recipe(r).with_(num_gpus=2)).notes)
    as_lora = plan_memory(inputs_from_recipe(r).with_(method="lora"))
    gpu_counts = [[s.set for s in suggest_fixes(x) if "training.num_gpus" in s.set] for x in (plan, as_lora)]
    assert gpu_counts[0] == gpu_counts[1]  # whatever N x the card LoRA gets (none here: activations), DoRA gets
