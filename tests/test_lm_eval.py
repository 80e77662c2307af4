"""lm-eval end to end: three tiny offline tasks (tests/data/lm_eval: loglikelihood, multiple
choice, generate_until) run through lm-eval's `local-completions` model against the real
server on a free port, on the local engine and on the vLLM engine, and through lm-eval's own
transformers model (`hf`) on the same fp32 weights. Every loglikelihood and every greedy
generation must agree between the three.

lm-eval's tokenizer is the server's: `tokenizer_backend=remote` probes GET /tokenizer_info
and POST /tokenize, and sends token ids (what its loglikelihood uses: echo, max_tokens 1,
logprobs 1)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from server_process import ServerProcess

if importlib.util.find_spec("lm_eval") is None and os.environ.get("LORAMIX_REQUIRE_ALL") != "1":
    pytest.skip("lm-eval is not installed (LORAMIX_REQUIRE_ALL=1 makes this fail)", allow_module_level=True)

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = REPO_ROOT / "tests" / "data" / "lm_eval"
TASKS = ["loramix_loglikelihood", "loramix_multiple_choice", "loramix_generate"]
API_KEY = "lm-eval-key"
BASE = "tiny"
ATOL = 1e-4  # per loglikelihood (a sum over a few tokens), fp32 throughout


def evaluate(model: str, model_args: str) -> dict[str, list]:
    """{task: [each request's response, in doc and request order]} from lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.chdir(REPO_ROOT)  # the task YAMLs name their data files relative to the repository
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True, batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return {
        task: [repeats[0] for sample in sorted(samples, key=lambda s: s["doc_id"]) for repeats in sample["resps"]]
        for task, samples in results["samples"].items()
    }


def serve_and_evaluate(engine: str, tiny_base, skills_dir, root: Path, **flags) -> dict[str, list]:
    server = ServerProcess(root / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                           served_model_name=BASE, cache_dir=root / "cache", api_key=API_KEY,
                           max_lora_rank=16, engine=engine, **flags)
    previous = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = API_KEY  # local-completions sends it as the bearer key
    try:
        return evaluate("local-completions", f"base_url={server.url}/v1/completions,model={BASE},"
                        f"tokenizer_backend=remote,auth_token={API_KEY},max_retries=1,timeout=120")
    finally:
        os.environ.pop("OPENAI_API_KEY") if previous is None else os.environ.update(OPENAI_API_KEY=previous)
        server.stop()


@pytest.fixture(scope="module")
def evaluations(tiny_base, skills_dir, tmp_path_factory):
    """engine -> lm-eval's responses, each engine evaluated once per module."""
    cache: dict[str, dict] = {}
    cwd = os.getcwd()

    def get(engine: str) -> dict[str, list]:
        if engine not in cache:
            root = tmp_path_factory.mktemp(f"lm_eval_{engine}")
            if engine == "hf":
                cache[engine] = evaluate("hf", f"pretrained={tiny_base},dtype=float32,device=cpu")
            elif engine == "vllm":
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
                cache[engine] = serve_and_evaluate("vllm", tiny_base, skills_dir, root, max_loras=2,
                                                   dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True,
                                                   ready_timeout_s=600)  # vLLM's start on a busy 2-core host
            else:
                cache[engine] = serve_and_evaluate("local", tiny_base, skills_dir, root)
        return cache[engine]
    yield get
    os.chdir(cwd)


def assert_agree(ours: dict[str, list], reference: dict[str, list]) -> None:
    """Same tasks, same requests; loglikelihoods within ATOL, is_greedy and texts equal."""
    assert set(ours) == set(reference) == set(TASKS)
    for task in ("loramix_loglikelihood", "loramix_multiple_choice"):
        assert len(ours[task]) == len(reference[task]) > 0
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours[task], reference[task]):
            assert ll == pytest.approx(ref_ll, abs=ATOL) and greedy == ref_greedy
            assert ll < 0
    # The multiple-choice task scored every choice of every question (4 questions, 11 choices).
    assert len(ours["loramix_multiple_choice"]) == 11
    # A trailing U+FFFD is dropped: when the output stops inside a UTF-8 character vLLM
    # withholds the incomplete bytes, transformers and the local engine emit U+FFFD.
    assert [text.rstrip("\ufffd") for text in ours["loramix_generate"]] == [
        text.rstrip("\ufffd") for text in reference["loramix_generate"]]


def test_local_engine_agrees_with_transformers(evaluations):
    assert_agree(evaluations("local"), evaluations("hf"))


@pytest.mark.vllm
def test_vllm_engine_agrees_with_transformers_and_the_local_engine(evaluations):
    if importlib.util.find_spec("vllm") is None and os.environ.get("LORAMIX_REQUIRE_ALL") != "1":
        pytest.skip("vLLM is not installed (LORAMIX_REQUIRE_ALL=1 makes this fail)")
    assert_agree(evaluations("vllm"), evaluations("hf"))
    assert_agree(evaluations("vllm"), evaluations("local"))
