"""Every bad input is a clear error: one line on stderr naming the problem, exit code 2, no traceback.

The CLI cases run the real command line in subprocesses (two at a time, all started by one fixture);
the cases a command line cannot reach (a drafter proposing ids outside the vocabulary, models the engine
cannot run losslessly) are checked on the library.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ctc_helpers import tiny_module
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import _COMMON, VOCAB, save_tiny_model_dir, tiny_model
from ctcspec.drafters.base import Drafter, DraftRequest
from ctcspec.drafters.lookup import LookupDrafter
from ctcspec.drafters.vanilla import VanillaDrafter
from ctcspec.engine import SpeculativeEngine
from ctcspec.errors import CtcspecError
from ctcspec.modules.files import describe_base, save_drafter
from ctcspec.tree import TokenTree

NOT_UTF8 = b"w1 w2 \xff\xfe w3\n"


def _copy_model(src: Path, dst: Path, corrupt) -> str:
    shutil.copytree(src, dst)
    corrupt(dst)
    return str(dst)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _remove_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (directory / name).unlink(missing_ok=True)


def _remove_chat_template(directory: Path) -> None:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _build_files(root: Path, model_dir: Path) -> SimpleNamespace:
    """Every bad file the CLI cases pass: unreadable text files, corrupt copies of the tiny model directory,
    and corrupt copies of a valid CTC drafter for it."""
    f = SimpleNamespace(model=str(model_dir), root=root, a_dir=str(root / "a-directory"))
    (root / "a-directory").mkdir()
    for name in ("prompt.txt", "questions.jsonl", "prompts.txt"):
        (root / name).write_bytes(NOT_UTF8)
    f.prompt, f.questions, f.prompts = (str(root / n) for n in ("prompt.txt", "questions.jsonl", "prompts.txt"))
    good_questions = root / "good-questions.jsonl"
    good_questions.write_text('{"question_id": 1, "category": "x", "turns": ["w1 w2 w3"]}\n')
    f.good_questions = str(good_questions)

    f.model_bad_json = _copy_model(model_dir, root / "model-bad-json",
                                   lambda d: (d / "config.json").write_text('{"model_type": "llama",'))
    f.model_garbage = _copy_model(model_dir, root / "model-garbage",
                                  lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)))
    f.model_truncated = _copy_model(model_dir, root / "model-truncated",
                                    lambda d: _truncate(d / "model.safetensors"))
    f.model_missing_tensors = _copy_model(model_dir, root / "model-missing-tensors",
                                          lambda d: _edit_json(d / "config.json", num_hidden_layers=3))
    f.model_no_tokenizer = _copy_model(model_dir, root / "model-no-tokenizer", _remove_tokenizer)
    f.model_no_template = _copy_model(model_dir, root / "model-no-template", _remove_chat_template)
    f.busy = socket.create_server(("127.0.0.1", 0))  # a port something already listens on (open while cases run)
    f.busy_port = str(f.busy.getsockname()[1])
    save_tiny_model_dir(root / "model-gemma", arch="gemma")
    f.model_gemma = str(root / "model-gemma")

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    good = root / "drafter"
    save_drafter(good, tiny_module(model), describe_base(model))

    def drafter_copy(name, corrupt):
        return _copy_model(good, root / name, corrupt)

    def non_utf8_config(d):
        text = (d / "config.json").read_text()
        (d / "config.json").write_bytes(text.replace('"ctc"', '"ctc\xe9"', 1).encode("latin-1"))

    def vocab_out_of_range(d):
        tensors = load_file(d / "model.safetensors")
        tensors["vocab_ids"][-1] = VOCAB + 7
        save_file(tensors, d / "model.safetensors")

    f.drafter_not_utf8 = drafter_copy("drafter-not-utf8", non_utf8_config)
    f.drafter_bad_json = drafter_copy("drafter-bad-json", lambda d: (d / "config.json").write_text("{"))
    f.drafter_base_not_object = drafter_copy("drafter-base", lambda d: _edit_json(d / "config.json", base="llama"))
    f.drafter_vocab = drafter_copy("drafter-vocab", vocab_out_of_range)
    return f


def _gen(f, *args):
    return ["generate", "--model", f.model, "--prompt", "w1 w2 w3", *args]


def _bench(f, *args):
    return ["bench", "--model", f.model, "--bench", f.good_questions, "--no-hf", "--out", str(f.root / "out"), *args]


# (case, argv from the files, phrases the one line must contain)
CASES = {
    "generate: non-UTF-8 --prompt-file": (
        lambda f: ["generate", "--model", f.model, "--prompt-file", f.prompt], ("prompt file", "not UTF-8")),
    "generate: --prompt-file is a directory": (
        lambda f: ["generate", "--model", f.model, "--prompt-file", f.a_dir], ("prompt file", "is a directory")),
    "generate: --prompt-file missing": (
        lambda f: ["generate", "--model", f.model, "--prompt-file", f.a_dir + "/none.txt"], ("does not exist",)),
    "bench: non-UTF-8 question file": (
        lambda f: [*_bench(f), "--bench", f.questions], ("question file", "not UTF-8")),
    "bench: question file is a directory": (
        lambda f: [*_bench(f), "--bench", f.a_dir], ("question file", "is a directory")),
    "distill: non-UTF-8 --prompts file": (
        lambda f: ["distill", "--model", f.model, "--prompts", f.prompts, "--out", str(f.root / "distilled")],
        ("prompt file", "not UTF-8")),
    "distill: --prompts file is a directory": (
        lambda f: ["distill", "--model", f.model, "--prompts", f.a_dir, "--out", str(f.root / "distilled")],
        ("prompt file", "is a directory")),
    "drafter: config.json not UTF-8": (
        lambda f: _gen(f, "--drafter-path", f.drafter_not_utf8), ("config.json", "not UTF-8")),
    "drafter: config.json not JSON": (
        lambda f: _gen(f, "--drafter-path", f.drafter_bad_json), ("config.json", "not valid JSON")),
    "drafter: base is not an object": (
        lambda f: _gen(f, "--drafter-path", f.drafter_base_not_object), ("'base' must be a JSON object",)),
    "drafter: vocab_ids outside the base vocabulary": (
        lambda f: _gen(f, "--drafter-path", f.drafter_vocab, "--tree-budget", "4"),
        ("vocab_ids", f"0..{VOCAB - 1}")),
    "model: config.json not JSON": (
        lambda f: _gen(f, "--model", f.model_bad_json), ("config.json", "not valid JSON")),
    "model: garbage model.safetensors": (
        lambda f: _gen(f, "--model", f.model_garbage), ("weights", "corrupt or truncated")),
    "model: truncated model.safetensors": (
        lambda f: _gen(f, "--model", f.model_truncated), ("weights", "corrupt or truncated")),
    "model: weights lack tensors config.json needs": (
        lambda f: _gen(f, "--model", f.model_missing_tensors), ("lack tensors", "model.layers.2.")),
    "model: no tokenizer files": (
        lambda f: _gen(f, "--model", f.model_no_tokenizer), ("no tokenizer files",)),
    "model: unknown --dtype": (
        lambda f: _gen(f, "--dtype", "float8"), ("unknown dtype", "float8")),
    "bench: --max-new-tokens 0": (
        lambda f: _bench(f, "--max-new-tokens", "0"), ("--max-new-tokens", "at least 1")),
    "bench: --max-new-tokens negative": (
        lambda f: _bench(f, "--max-new-tokens", "-5"), ("--max-new-tokens", "at least 1")),
    "generate: --max-new-tokens 0": (
        lambda f: _gen(f, "--max-new-tokens", "0"), ("--max-new-tokens", "at least 1")),
    "generate: --threads 0": (
        lambda f: _gen(f, "--threads", "0"), ("--threads", "at least 1")),
    "bench: --threads negative": (
        lambda f: _bench(f, "--threads", "-2"), ("--threads", "at least 1")),
    "generate: --device nonsense": (
        lambda f: _gen(f, "--device", "nonsense"), ("--device 'nonsense'", "not a torch device")),
    "generate: --device cuda:7": (
        lambda f: _gen(f, "--device", "cuda:7"), ("--device cuda:7", "CUDA device")),
    "generate: --backend static on a Gemma model": (
        lambda f: _gen(f, "--model", f.model_gemma, "--backend", "static"),
        ("static backend cannot run this model", "'gemma'", "--backend hf")),
    "bench: unknown --peers": (
        lambda f: _bench(f, "--peers", "sglang"), ("--peers", "unknown peer 'sglang'")),
    "generate: --temperature negative": (
        lambda f: _gen(f, "--temperature", "-1"), ("--temperature", "0 or at least 1e-05, got -1")),
    "generate: --top-p above 1": (
        lambda f: _gen(f, "--top-p", "1.5"), ("--top-p", "in (0, 1], got 1.5")),
    "bench: --top-k 0": (
        lambda f: _bench(f, "--top-k", "0"), ("--top-k", "at least 1")),
    "generate: --repetition-penalty 0": (
        lambda f: _gen(f, "--repetition-penalty", "0"), ("--repetition-penalty", "above 0")),
    "generate: --top-k without sampling": (
        lambda f: _gen(f, "--top-k", "5"), ("--top-k only shape sampling", "--temperature", "--sample")),
    "bench: --peers with sampling": (
        lambda f: _bench(f, "--peers", "llama.cpp", "--temperature", "1"), ("--peers", "greedily only")),
    "bench: --peers with a repetition penalty": (
        lambda f: _bench(f, "--peers", "llama.cpp", "--repetition-penalty", "1.3"), ("--peers", "logits processors")),
    "generate: --seed too large": (
        lambda f: _gen(f, "--temperature", "1", "--seed", str(2**64)), ("--seed", "must be in [0, 2**63)")),
    "generate: --seed without sampling": (
        lambda f: _gen(f, "--seed", "3"), ("--seed only shape sampling", "--temperature")),
    "serve: --port out of range": (
        lambda f: ["serve", "--model", f.model, "--port", "70000"], ("--port", "0..65535, got 70000")),
    "serve: --port already in use": (
        lambda f: ["serve", "--model", f.model, "--port", f.busy_port],
        ("cannot listen on 127.0.0.1:", "in use")),
    "serve: --host not an address of this machine": (
        lambda f: ["serve", "--model", f.model, "--host", "203.0.113.9"], ("cannot listen on 203.0.113.9:8000",)),
    "serve: --max-queue 0": (
        lambda f: ["serve", "--model", f.model, "--max-queue", "0"], ("--max-queue", "at least 1")),
    "chat: a model without a chat template": (
        lambda f: ["chat", "--model", f.model_no_template], ("no chat template",)),
    "chat: --top-p without sampling": (
        lambda f: ["chat", "--model", f.model, "--top-p", "0.5"], ("--top-p only shape sampling",)),
}
CASES["generate: --backend llama.cpp with --gguf q8_0"] = (
    lambda f: _gen(f, "--backend", "llama.cpp", "--gguf", "q8_0"), ("--backend llama.cpp takes --gguf f32",))
CASES["generate: a drafter on a bfloat16 model on the CPU"] = (
    lambda f: _gen(f, "--dtype", "bfloat16", "--drafter", "lookup"),
    ("lookup drafter", "bfloat16 on the CPU", "float32"))
CASES["bench: drafters on a float16 model on the CPU"] = (
    lambda f: _bench(f, "--dtype", "float16", "--drafters", "vanilla,lookup"), ("lookup drafter", "float16 on the CPU"))
CASES["generate: --backend llama.cpp with --dtype bfloat16"] = (
    lambda f: _gen(f, "--backend", "llama.cpp", "--dtype", "bfloat16"), ("llama.cpp runs on the CPU", "--gguf"))
if importlib.util.find_spec("llama_cpp") is None:  # `make test` builds llama.cpp; a bare install does not
    CASES["bench: --peers llama.cpp without llama-cpp-python"] = (
        lambda f: _bench(f, "--peers", "llama.cpp"), ("llama-cpp-python", "make peers"))
if not torch.cuda.is_available():
    CASES["generate: --device cuda (no GPU)"] = (lambda f: _gen(f, "--device", "cuda"), ("--device cuda", "0 CUDA"))


def _run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CTCSPEC_HOME: conftest's private home, inherited
    return subprocess.run([sys.executable, "-m", "ctcspec", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_outcomes(tiny_model_dir, tmp_path_factory):
    """Every CLI case run once, two subprocesses at a time (each pays torch's import, ~4 s)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    files = _build_files(root, Path(tiny_model_dir))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run_cli, argv(files), root) for case, (argv, _) in CASES.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input_is_one_clear_line(cli_outcomes, case):
    result = cli_outcomes[case]
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.returncode == 2, (result.returncode, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.strip(), f"not exactly one line on stderr:\n{err}"
    assert err.startswith("ctcspec"), err
    for phrase in CASES[case][1]:
        assert phrase in err, f"{phrase!r} not in {err!r}"


# --- library level -----------------------------------------------------------------------------------------------


class _OutOfVocabDrafter(Drafter):
    name = "rogue"

    def __init__(self, token: int):
        self.token = token

    def propose(self, request: DraftRequest) -> TokenTree:
        return TokenTree((3, self.token), (-1, 0))


@pytest.mark.parametrize("token", [VOCAB, VOCAB + 1000, -1])
def test_drafter_proposing_ids_outside_the_vocabulary_is_refused(token):
    engine = SpeculativeEngine(tiny_model("llama"), _OutOfVocabDrafter(token))
    with pytest.raises(CtcspecError, match=rf"rogue drafter proposed token id {token}, outside .*0\.\.{VOCAB - 1}"):
        engine.generate([1, 5, 6, 7], 8)


def test_linear_attention_hybrid_is_refused():
    from transformers import Qwen3NextConfig

    config = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(CtcspecError, match="cannot roll back .* not supported"):
        SpeculativeEngine(model, VanillaDrafter())


@pytest.mark.parametrize("attention", ["flash_attention_2", "flex_attention"])
def test_attention_without_a_tree_mask_is_refused(attention):
    model = tiny_model("llama")
    model.config._attn_implementation = attention
    with pytest.raises(CtcspecError, match=f"attention implementation '{attention}' cannot take a tree attention"):
        SpeculativeEngine(model, LookupDrafter())


def test_prompt_too_long_for_a_sliding_window_names_the_window():
    from transformers import MistralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**_COMMON, sliding_window=48)).eval()
    model.generation_config.eos_token_id = None
    engine = SpeculativeEngine(model, LookupDrafter())
    with pytest.raises(CtcspecError, match="the prompt has 60 tokens; the model's sliding window of 48 tokens"):
        engine.generate(list(range(3, 63)), 8)
    assert engine.generate(list(range(3, 40)), 4).tokens  # inside the window it runs


def test_main_turns_os_errors_and_multiline_messages_into_one_line(capsys, monkeypatch):
    from ctcspec import cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "/somewhere/out")

    def multiline(args):
        raise CtcspecError("first line\nsecond line")

    for command, expected in ((refused, "ctcspec: error: /somewhere/out: Permission denied\n"),
                              (multiline, "ctcspec: error: first line second line\n")):
        monkeypatch.setitem(cli.COMMANDS, "report", command)
        assert cli.main(["report", "x"]) == 2
        assert capsys.readouterr().err == expected


def test_drafter_config_problems_found_before_the_model_loads(tmp_path):
    from ctcspec.modules.files import drafter_kind

    model = tiny_model("llama")
    save_drafter(tmp_path / "d", tiny_module(model), describe_base(model))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    for curve in ([1, 2], {"beam": [0.5]}, {"beam": {"four": 0.5}}, {"beam": {"0": 0.5}}, {"beam": {"4": -1}}):
        (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "acceptance_curve": curve}))
        with pytest.raises(CtcspecError, match="'acceptance_curve' must map search modes"):
            drafter_kind(tmp_path / "d")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CtcspecError, match="is a file, not a drafter directory"):
        drafter_kind(tmp_path / "a-file")


def test_unreadable_distilled_data_and_corrupt_checkpoint_are_clear_errors(tmp_path):
    from ctcspec.training.distill import _read_instructions, read_samples
    from ctcspec.training.train import TrainConfig, train

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "samples.jsonl").write_bytes(NOT_UTF8)
    with pytest.raises(CtcspecError, match="distilled data file .* is not UTF-8"):
        read_samples(tmp_path / "bad")
    cache = tmp_path / "bad" / "self_instruct.jsonl"
    cache.write_text('{"text": "a"}\n[1]\n{"text": "c"}\n')
    with pytest.raises(CtcspecError, match="line 2 is corrupt"):
        _read_instructions(cache)
    cache.write_text('{"text": "a"}\n{"text": "b"}\n{"te')  # cut short by an interrupted run: dropped
    assert _read_instructions(cache) == ["a", "b"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "samples.jsonl").write_text("".join(
        json.dumps({"index": i, "source": "t", "prompt_len": 3, "ids": [3 + i, 4, 5, 6, 7, 8]}) + "\n"
        for i in range(4)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage" * 64)
    with pytest.raises(CtcspecError, match="checkpoint.pt is corrupt or truncated"):
        train(tiny_model("llama"), [data], out, TrainConfig(heldout_every=2), resume=True, progress=False)
