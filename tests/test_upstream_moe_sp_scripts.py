"""Upstream Megatron-DeepSpeed's MoE and sequence-parallel example scripts, run here at tiny size.

``examples_deepspeed/MoE/ds_pretrain_gpt_125M_MoE64.sh`` and
``examples_deepspeed/sequence_parallel/ds_pretrain_gpt_1.3B_seq_parallel_32k.sh`` are our
copies of upstream's (same flags; sizes, paths and the layout come from environment
variables). Each case trains, saves, converts with tools/convert_to_universal.py, resumes on
another layout (EP 2 -> EP 1; Ulysses SP 2 -> TP 2) and checks with
tools/compare_loss_curves.py that the loss curve continues. The flags of upstream features not
built here are refused by name; the flags they pass that mean something here do it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.arguments import ConfigError, parse_args
from megatron.model.moe import route
from megatron.model.moe_config import MoEConfig, moe_config_from_args
from megatron.testing.launchers import REPO
from megatron.testing.training import TINY_GPT, inspect_trained

SAVE, END = 3, 6
SEQ, GBS = 32, 4
TINY = {"SEQ_LEN": str(SEQ), "NUM_LAYERS": "2", "HIDDEN_SIZE": "32", "NUM_ATTN_HEADS": "4",
        "GLOBAL_BATCH_SIZE": str(GBS), "TRAIN_TOKENS": str(END * GBS * SEQ), "LR_DECAY_TOKENS": str(END * GBS * SEQ),
        "SAVE_INTERVAL": str(SAVE), "LOG_INTERVAL": "1", "EVAL_INTERVAL": "100", "EVAL_ITERS": "1",
        "NUM_DOCS": "300", "TOKENIZER_VOCAB": "400"}
MOE = REPO / "examples_deepspeed" / "MoE" / "ds_pretrain_gpt_125M_MoE64.sh"
SP = REPO / "examples_deepspeed" / "sequence_parallel" / "ds_pretrain_gpt_1.3B_seq_parallel_32k.sh"


def run(script: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    full.update(TINY, OUTPUT_BASEPATH=str(tmp), OUTPUT_HOME=str(tmp), PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


# (script, precision, environment of the training run, of the resumed run)
CASES = {
    "moe-ep2-to-ep1": (MOE, "fp32", {"NUM_GPUS": "2", "EP_SIZE": "4", "EP_PARALLEL_SIZE": "2", "BATCH_SIZE": "2",
                                      "WARMUP_TOKENS": str(GBS * SEQ)},
                       {"NUM_GPUS": "1", "EP_SIZE": "4", "EP_PARALLEL_SIZE": "1", "BATCH_SIZE": "4",
                        "WARMUP_TOKENS": str(GBS * SEQ)}),
    "sp2-to-tp2": (SP, "fp16", {"NUM_GPUS": "2", "SP_SIZE": "2", "BATCH_SIZE": "2", "LR_WARMUP_TOKENS": str(GBS * SEQ)},
                   {"NUM_GPUS": "2", "SP_SIZE": "1", "MP_SIZE": "2", "BATCH_SIZE": "4",
                    "LR_WARMUP_TOKENS": str(GBS * SEQ)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_upstream_script_trains_converts_resumes_on_another_layout_and_continues(tmp_path: Path, case: str) -> None:
    script, precision, train_env, resume_env = CASES[case]
    ckpt, tb_ref, tb_res = tmp_path / "ckpt", tmp_path / "tb" / "reference", tmp_path / "tb" / "resumed"
    ok(run(script, tmp_path, PRECISION=precision, CHECKPOINT_PATH=str(ckpt), TENSORBOARD_DIR=str(tb_ref),
           TENSORBOARD_PATH=str(tb_ref), **train_env), "training")
    assert sorted(p.name for p in ckpt.glob("global_step*")) == [f"global_step{SAVE}", f"global_step{END}"]
    ok(subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_universal.py"),
                       "--input_folder", str(ckpt / f"global_step{SAVE}"),
                       "--output_folder", str(ckpt / f"global_step{SAVE}_universal"), "--no-progress"],
                      capture_output=True, text=True, cwd=REPO), "conversion")
    log = ok(run(script, tmp_path, PRECISION=precision, CHECKPOINT_PATH=str(tmp_path / "resumed"),
                 LOAD_PATH=str(ckpt), UNIVERSAL_CHECKPOINT="true", TENSORBOARD_DIR=str(tb_res),
                 TENSORBOARD_PATH=str(tb_res), **resume_env), "resumed training")
    assert f"(universal) at iteration {SAVE}" in log
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare_loss_curves.py"), "--reference", str(tb_ref),
                           "--resumed", str(tb_res), "--precision", precision, "--resume-iteration", str(SAVE)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and f"over {END - SAVE} iterations" in proc.stdout
    if script == SP:  # upstream's script logs the optimizer's state
        rows = [json.loads(line) for line in (tb_ref / "metrics.jsonl").read_text().splitlines()]
        rows = [row for row in rows if "lm-loss-training/lm loss" in row]
        assert len(rows) == END
        assert all(row["optimizer/weight_l2"] > 0 and row["optimizer/variance_abs_max"] > 0 for row in rows)


def test_curriculum_learning_in_the_script_config_is_refused_by_name(tmp_path: Path) -> None:
    proc = run(MOE, tmp_path, NUM_GPUS="1", EP_SIZE="2", BATCH_SIZE="4", WARMUP_TOKENS="128", CL_ENABLED="true")
    assert proc.returncode != 0
    assert "curriculum_learning.enabled = true is not supported here" in proc.stdout + proc.stderr


MOE_ARGS = TINY_GPT + ["--train-iters", "2", "--num-experts", "4"]


@pytest.mark.parametrize("flags,message", [
    (["--mlp-type", "residual"], "--mlp-type residual: PR-MoE's residual MLP is not built here"),
    (["--mos"], "--mos (mixture-of-students / knowledge distillation is not built here)"),
    (["--kd", "--kd-temp", "1.0"], "--kd (mixture-of-students / knowledge distillation is not built here)"),
    (["--load-teacher", "x"], "--load-teacher (mixture-of-students"),
    (["--curriculum-learning-legacy"], "--curriculum-learning-legacy (curriculum learning is not built here)"),
    (["--disable-moe-token-dropping", "--moe-eval-capacity-factor", "1.0"], "--disable-moe-token-dropping with a"),
])
def test_unbuilt_upstream_features_are_refused_by_name(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(MOE_ARGS + flags, 1)
    assert message in str(err.value)


def test_no_op_flags_are_accepted_and_say_so_in_help() -> None:
    args = parse_args(MOE_ARGS + ["--create-moe-param-group", "--no-async-tensor-model-parallel-allreduce",
                                  "--use-flash-attn-triton", "--mlp-type", "standard"], 1)
    assert args.create_moe_param_group and args.use_flash_attn_triton
    help_text = subprocess.run([sys.executable, "pretrain_gpt.py", "--help"], capture_output=True, text=True,
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    for flag in ("--create-moe-param-group", "--no-async-tensor-model-parallel-allreduce", "--use-flash-attn-triton"):
        after = " ".join(help_text.rsplit(flag, 1)[1].split()[:3])  # its entry, after the usage line
        assert after.startswith("no-op"), f"{flag}: {after}"


def test_eval_capacity_factor_routes_evaluation_only() -> None:
    cfg = moe_config_from_args(parse_args(MOE_ARGS + ["--moe-train-capacity-factor", "0.5",
                                                      "--moe-eval-capacity-factor", "2.0"], 1))
    assert (cfg.capacity_factor, cfg.eval_capacity_factor) == (0.5, 2.0)
    torch.manual_seed(0)
    logits = torch.randn(3 * 8, 4)
    train, evaluation = route(logits, cfg, 8, training=True), route(logits, cfg, 8, training=False)
    plain = route(logits, MoEConfig(**{**cfg.__dict__, "eval_capacity_factor": None}), 8, training=False)
    assert torch.equal(plain.experts, train.experts)  # unset: evaluation routes as training does
    assert int((train.experts < 0).sum()) > 0  # capacity ceil(0.5 * 8 * 2 / 4) = 2 drops some
    assert int((evaluation.experts < 0).sum()) == 0  # capacity 8: every assignment fits
    assert torch.equal(evaluation.experts, evaluation.chosen)


def test_prescale_gradients_is_accepted_other_predivide_factors_are_not(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    base = [a for a in TINY_GPT] + ["--train-iters", "2", "--deepspeed", f"--deepspeed_config={path}"]
    path.write_text(json.dumps({"prescale_gradients": True}))
    parse_args(base, 1)
    path.write_text(json.dumps({"prescale_gradients": True, "gradient_predivide_factor": 2.0}))
    with pytest.raises(ConfigError, match="gradient_predivide_factor = 2.0 is not supported here"):
        parse_args(base, 1)


def _state_norms(trainer) -> dict[str, float]:
    return trainer.optimizer.state_norms()


def _direct_norms(trainer) -> dict[str, float]:
    """One rank, ZeRO 0: the norms straight from the optimizer's full fp32 tensors."""
    out = {}
    for name, attr in (("variance", "exp_avg_sq"), ("momentum", "exp_avg"), ("weight", "master")):
        flat = torch.cat([getattr(g, attr) for g in trainer.optimizer.groups]).double()
        out[f"{name}_l2"], out[f"{name}_l1"] = float(flat.norm()), float(flat.abs().sum())
        out[f"{name}_abs_max"] = float(flat.abs().max())
    return out


def test_optimizer_state_norms_are_the_whole_models_on_any_layout() -> None:
    base = TINY_GPT + ["--train-iters", "2", "--log-optimizer-states-to-tensorboard"]
    reference = inspect_trained(1, base, _state_norms)[0]
    direct = inspect_trained(1, base + ["--zero-stage", "0"], _direct_norms)[0]
    for key, value in direct.items():
        assert reference[key] == pytest.approx(value, rel=1e-5), key
    assert reference["variance_sqrt_l1"] > 0 and reference["momentum_abs_max"] > 0
    for layout in (["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"],
                   ["--zero-stage", "1"]):  # world 2: TP 2, PP 2, DP 2 with ZeRO-1 partitions
        for rank_values in inspect_trained(2, base + layout, _state_norms):
            for key, value in reference.items():
                assert rank_values[key] == pytest.approx(value, rel=1e-5), (layout, key)
