"""The one config schema for the whole pipeline.

`configs/*.yaml` are data validated by these pydantic models; every stage reads its own section.
Unknown keys and bad values raise `ConfigError`, which names the key path and what was expected.
CLI overrides are `a.b.c=value` (the value parsed as YAML, so `train.lr=3e-4` is a float).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that does not match the schema; the message names every offending key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------- storage / ray
class StorageConfig(Section):
    run_dir: str = Field("runs/demo", description="Local path or s3://bucket/prefix holding every stage's output")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, Ceph...)")
    s3_region: str | None = None
    # Credentials come from the environment (AWS_ACCESS_KEY_ID, ...) or instance roles: never from configs.
    anon: bool = False


class RayConfig(Section):
    address: str | None = Field(None, description="None: $RAY_ADDRESS or a new local Ray; 'auto' or host:port")
    num_cpus: int | None = Field(None, description="Logical CPUs of a local Ray (default max(4, cores))")
    object_store_memory_mb: int | None = None
    include_dashboard: bool = False
    namespace: str = "ralm"


# ---------------------------------------------------------------------------------------------- corpus
class RecipeSpec(Section):
    name: str = Field(..., description="Registered recipe: demo, manifest, table, folder, librispeech, esc50, captions, commonvoice")
    root: str | None = Field(None, description="Folder of the dataset on disk (the demo builds its own)")
    limit: int | None = Field(None, ge=1, description="At most this many clips from this recipe")
    split: str | None = Field(None, description="Force every clip of this recipe into this split")
    options: dict[str, Any] = Field(default_factory=dict, description="Recipe-specific options")

    @model_validator(mode="after")
    def _known_recipe_and_options(self) -> RecipeSpec:
        # Checked here, so a typo stops `ralm run` before Ray starts rather than inside the corpus stage.
        from ralm.corpus.recipes import get_recipe

        try:
            recipe = get_recipe(self.name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        if self.root is None and self.name != "demo":  # only the demo makes its own files
            raise ValueError(f"recipe {self.name!r} needs a root folder (root: /path/to/the/dataset)")
        check = getattr(recipe, "configured", None)
        if check is not None:
            check(self.options)
        return self


class CorpusConfig(Section):
    recipes: list[RecipeSpec] = Field(default_factory=lambda: [RecipeSpec(name="demo")])
    sample_rate: int = Field(16000, gt=0, description="Rate clips are validated/decoded at")
    min_seconds: float = Field(0.2, ge=0)
    max_seconds: float = Field(60.0, gt=0, description="ALARM keeps clips <= 60 s")
    silence_dbfs: float = Field(-60.0, description="A clip whose peak is below this is rejected as silent")
    max_file_mb: float = Field(512.0, gt=0, description="Files larger than this are rejected unread")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="Hash-based held-out split of clips")
    valid_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    assets_dir: str | None = Field(None, description="Where the demo synthesizes audio (default: run_dir/assets)")
    batch_size: int = Field(32, ge=1, description="Records per Ray Data validation batch")
    part_rows: int = Field(256, ge=1, description="Rows per committed Parquet part")


# ---------------------------------------------------------------------------------------------- LLM side
class ThinkingConfig(Section):
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    budget_tokens: int | None = Field(1536, ge=1, description="Force-close the thought after this many tokens")
    force_close_text: str = "\n\nI have thought enough; time to answer.\n"
    ask_to_think: bool = Field(False, description="Ask a non-reasoning model to think inside the tags")


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ServeConfig(Section):
    num_replicas: int = Field(2, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_ongoing_requests: int = Field(16, ge=1)
    max_in_flight: int = Field(8, ge=1, description="Requests the batch client keeps in flight")
    parts_in_flight: int = Field(
        2, ge=1, description="Parts the text stages process at once (a part's retry rounds overlap the next "
        "part's first round; each part still commits atomically)")
    request_timeout_s: float = Field(300.0, gt=0)
    max_retries: int = Field(3, ge=0, description="Re-sends of a request whose replica died or timed out")
    app_name: str = Field("ralm-llm", description="Serve application name (also the served model name)")
    route_prefix: str = Field("/", description="HTTP prefix of the app: the OpenAI base URL is {prefix}/v1")
    max_batch_size: int = Field(32, ge=1, description="Rows the transformers engine decodes in one batch "
                                "(vLLM schedules every request in flight itself)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="An idle replica waits this long after a first "
                                        "request so a burst shares its first engine step")


class LLMConfig(Section):
    model: str = Field("smollm2-135m-demo", description="Registered offline model, local folder, or hub id")
    engine: Literal["vllm", "transformers"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(2048, ge=64)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    cpu_kvcache_gb: float = Field(1.0, gt=0, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE, fractions ok)")
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = Field(None, description="None: eager on CPU, CUDA graphs on GPU")
    allow_network: bool = Field(False, description="Let a hub id in `model` download (never in the demo)")
    thinking: ThinkingConfig = Field(default_factory=ThinkingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(512, ge=1)
    seed: int = 0


class PromptsConfig(Section):
    source: Literal["template", "llm"] = "template"
    per_clip: int = Field(1, ge=1, description="Task prompts kept per clip")
    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Template task -> how likely it is picked (1 when unlisted, 0 = never), e.g. {gender: 4}",
    )
    candidates: int = Field(4, ge=1, description="LLM-proposed candidates per clip before the checker")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.9, max_new_tokens=96))
    check: bool = Field(True, description="Ask the LLM checker (YES/NO) to filter proposed prompts")
    # Test clips never get targets: they are held out for evaluation and must never reach training.
    splits: list[str] = Field(default_factory=lambda: ["train", "valid"], description="Splits that get prompts")
    seed: int = 0
    part_rows: int = Field(256, ge=1, description="Clips per committed Parquet part")


class GenerationConfig(Section):
    system_prompt: str = (
        "You are an audio-understanding model. The audio is given between <start_audio> and <end_audio>."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    best_of_n: int = Field(4, ge=1, description="Candidates sampled until one agrees with the metadata")
    min_tokens: int = Field(1, ge=0, description="Shorter responses are not kept (ALARM: 100 on its 4B model)")
    max_tokens: int = Field(612, ge=1, description="Longer responses are not kept (ALARM: 612)")
    part_rows: int = Field(64, ge=1)
    backend: Literal["serve", "engine"] = Field(
        "serve", description="serve: Ray Serve replicas through the batch client; engine: in-process (tests)"
    )
    fallback: Literal["metadata", "reject"] = Field(
        "metadata",
        description="No verified answer within best_of_n: a grounded answer from the metadata, labelled "
        "verdicts.target_source=metadata_fallback (metadata) or a reject row (reject)",
    )


class RephraseConfig(Section):
    enabled: bool = True
    renamed_think_tag: str = "text_llm_reasoning"
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.3))
    max_attempts: int = Field(3, ge=1)
    max_length_ratio: float = Field(1.6, gt=1)
    min_length_ratio: float = Field(0.5, gt=0, lt=1)
    judge: bool = Field(False, description="Ask the LLM judge whether a text description leaks")
    judge_max_regenerations: int = Field(1, ge=0)
    length_slack_tokens: int = Field(8, ge=0, description="Absolute slack on the length bounds (short answers)")
    on_failure: Literal["reject", "keep_clean_original"] = Field(
        "reject",
        description="No acceptable rewrite after max_attempts: reject the row, or keep the original when it "
        "is verified and leak-free (verdicts.rephrase=kept_original)",
    )
    audit_nll_samples: int = Field(64, ge=0, description="Rows scored for the report's NLL comparison")
    part_rows: int = Field(64, ge=1)


# ---------------------------------------------------------------------------------------------- audio side
class EncoderSpec(Section):
    name: str = Field(..., description="Registered encoder (whisper, crepe, w2v-bert, sslam, muq); no '.'")
    model: str = Field(..., description="Offline model name (whisper-tiny.en-ct2, crepe-tiny), local path, or hub id")
    layers: list[int] = Field(default_factory=list, description="Tapped layers (empty: the encoder's default)")
    batch_size: int = Field(8, ge=1)
    pool_min: int = Field(1, ge=1)
    pool_max: int = Field(2, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrent_batches: int = Field(
        1, ge=1,
        description="Batches one actor encodes at once, each on its own thread (torch releases the GIL in its "
        "kernels; set options.threads to 1). On a CPU node one actor with N concurrent batches does the work "
        "of N actors with one process start-up and one copy of the models",
    )
    pool: str | None = Field(
        None,
        description="Encoders naming the same pool share one actor pool: each actor loads all of them and "
        "runs each in turn on every batch (small encoders on one GPU; CPU nodes, where a pool per encoder "
        "leaves cores idle while the slower one catches up). The shared pool takes its members' largest "
        "pool_min/pool_max/num_cpus/num_gpus/threads and smallest batch_size. None: the encoder's own pool",
    )
    options: dict[str, Any] = Field(default_factory=dict)


class FeaturesConfig(Section):
    # Whisper taps use transformers' hidden_states numbering (0 = embeddings, 4 = tiny's final output);
    # CREPE taps are its conv blocks 1..6 (5 = torchcrepe.embed).
    encoders: list[EncoderSpec] = Field(
        default_factory=lambda: [
            EncoderSpec(name="whisper", model="whisper-tiny.en-ct2", layers=[2, 4], batch_size=4),
            EncoderSpec(name="crepe", model="crepe-tiny", layers=[5], batch_size=4),
        ]
    )
    decode_num_cpus: float = Field(0.5, gt=0)
    decode_batch_size: int = Field(16, ge=1)
    decode_concurrency: int = Field(2, ge=1, description="Decode tasks at once (when decoding runs in tasks)")
    decode_in_actor: bool | None = Field(
        None,
        description="Decode in the first encoder pool's actors instead of in decode tasks. None (auto): when "
        "that pool asks for no GPU. On CPU nodes decoding is a fraction of a percent of the encoders' work, "
        "and decode tasks cost worker processes, a scheduling round and an object-store copy of every "
        "waveform; GPU actors keep decoding in CPU tasks beside them so the GPU is not kept waiting",
    )
    splits: list[str] = Field(default_factory=lambda: ["train", "valid", "test"])


class ShardsConfig(Section):
    uri: str | None = Field(None, description="Where shards go (default run_dir/features/shards); s3:// ok")
    target_mb: float = Field(64.0, gt=0)
    dtype: Literal["float16", "float32"] = Field("float16", description=".npy has no bfloat16: fp16 or fp32")


# ---------------------------------------------------------------------------------------------- train / eval
LossAverage = Literal["token", "sample"]  # see ralm.model.alm.ALM.answer_loss


class TrainConfig(Section):
    adapter: str = "downsampler"
    adapter_hidden: int = Field(1024, ge=8)
    fusion: str = "sum"
    fusion_options: dict[str, Any] = Field(default_factory=dict)
    num_workers: int = Field(2, ge=1)
    min_workers: int | None = Field(None, ge=1, description="Elastic lower bound where supported")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(1500, ge=0)
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, description="Per-worker micro batch")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    loss_average: LossAverage = Field(
        "token", description="Answer-token loss: mean over all tokens of a batch (token) or per answer, then over answers (sample: short answers weigh as much as long ones)")
    max_length: int = Field(4096, ge=16)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    torch_threads: int | None = None
    targets: Literal["auto", "rephrase", "generate"] = Field(
        "auto", description="Target source: rephrase `rephrased`, generate `response`, or auto (rephrase if any)")
    rephrase_field: str = Field("rephrased", description="Column of the rephrase data used as the target")
    bucket_batches: int = Field(16, ge=1, description="Batches per length-sorting buffer (more: less padding)")
    system_prompt: str | None = Field(None, description="None: no system turn at train time (ALARM)")
    trace_samples: bool = Field(False, description="Debug: log every trained sample id per epoch and rank")


class AlmServeConfig(Section):
    """The trained ALM behind an OpenAI-compatible `/v1/chat/completions` (Ray Serve)."""

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    route_prefix: str = "/"
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica holds at once: above "
                                      "max_batch_size, so the next batch forms while one runs (80 concurrent "
                                      "clients on 2 cores: full batches of 8, none retried by Serve's router)")
    max_audio_mb: float = Field(16.0, gt=0, description="Largest decoded-before audio payload accepted")
    max_audio_seconds: float = Field(60.0, gt=0, description="Longest clip accepted (ALARM keeps <= 60 s)")
    max_new_tokens: int = Field(512, ge=1, description="Upper bound on a request's max_tokens")
    max_batch_size: int = Field(8, ge=1, description="Concurrent requests a replica answers in one engine call "
                                "(same sampling settings and system message); 1: one at a time")
    batch_wait_ms: float = Field(50.0, ge=0, description="How long a batch waits for requests to join it when "
                                 "fewer are queued than the last batch held (a quiet replica never waits)")
    feature_cache_mb: float = Field(256.0, ge=0, description="Encoder output kept per replica for the clips seen "
                                    "last: a follow-up turn resends its clip and is not encoded again; 0: off")

    @model_validator(mode="after")
    def _batch_fits(self) -> AlmServeConfig:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) > max_ongoing_requests "
                             f"({self.max_ongoing_requests}): a replica is never sent that many requests at once")
        return self


class McqFields(Section):
    """`eval.benchmark: mcq`: any multiple-choice file (JSON list, JSON lines, CSV, TSV or Parquet), mapped
    without code: which column holds what."""

    id: str | None = Field("id", description="Item id column (None, or a missing value: the row number)")
    audio: str = Field("audio", description="Audio path column: relative to eval.audio_root (default: the "
                       "file's folder), absolute, or a URI")
    question: str = "question"
    choices: str | list[str] = Field("choices", description="A column holding the list of choices (a list, or "
                                     "text such as '[\"a\", \"b\"]'), or the columns holding one choice each "
                                     "(empty ones are skipped)")
    answer: str = Field("answer", description="The right choice's column")
    answer_format: Literal["auto", "text", "letter", "index0", "index1"] = Field(
        "auto", description="How the answer names the right choice: its text, its letter (A = the first), its "
        "0- or 1-based index; auto: the text, else a letter")
    domain: str | None = Field(None, description="Column with the item's domain (speech, sound, music...)")
    group_by: list[str] = Field(default_factory=list, description="Columns the report breaks accuracy down by "
                                "(with domain: by domain too)")
    scorer: Literal["string_match", "letter"] = Field(
        "string_match", description="How a reply is matched to a choice when answer_mode is generate")


class EvalConfig(Section):
    benchmark: str = Field("demo", description="Registered benchmark: demo, mmau, mmsu, mmar, or mcq (any "
                           "multiple-choice file, mapped by eval.fields)")
    fields: McqFields = Field(default_factory=McqFields, description="benchmark mcq: where each part of an item is")
    data: str | None = Field(None, description="Benchmark file (demo: default run_dir/eval/demo_mcq.json, built)")
    audio_root: str | None = Field(None, description="Audio paths in the file are relative to this")
    backend: Literal["transformers", "vllm"] = "transformers"
    adapters: list[str] = Field(
        default_factory=list,
        description="Exported adapter dirs; empty: the train stage's export. Several: an ALARM-E ensemble",
    )
    ensemble_glue: str = Field("This is what you hear, pass {i} of {n}:",
                               description="Text before each adapter's audio in an ensemble")
    instruction: str = Field(
        "Choose the correct option. Reply with the option's number inside answer tags, "
        "for example <answer>1</answer>.",
        description="Appended to every MCQ question after the numbered choices",
    )
    answer_mode: Literal["generate", "likelihood", "pmi"] = Field(
        "generate",
        description="generate: the ALM writes <answer>N</answer> after the numbered choices (the benchmarks' "
        "protocol); likelihood: the question alone, each choice scored as the reply by its mean token "
        "log-probability, the most likely chosen (cloze style, for LLMs too small to follow an answer "
        "format); pmi: likelihood minus the same choice's likelihood with no audio at all, so the LLM's "
        "prior for the choice words cancels and only what the audio adds decides",
    )
    max_new_tokens: int = Field(64, ge=1)
    controls: list[Literal["shuffled", "silence"]] = Field(default_factory=lambda: ["shuffled", "silence"])
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, description="Items per Ray Data inference batch")
    concurrency: int = Field(1, ge=1, description="Inference actors (each loads encoders + ALM)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per inference actor")
    num_gpus: float = Field(0.0, ge=0)
    mcq_per_clip: int = Field(2, ge=1, description="Demo MCQ: questions per held-out clip")
    mcq_facts: list[str] | None = Field(None, description="Demo MCQ: facts asked about (None: the defaults)")
    seed: int = 0
    text_check: bool = Field(True, description="Report whether text-only prompts give the frozen LLM's output")
    serve: AlmServeConfig = Field(default_factory=AlmServeConfig)


class RalmConfig(Section):
    name: str = "demo"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rephrase: RephraseConfig = Field(default_factory=RephraseConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def stage_uri(self, stage: str, run_dir: str | None = None) -> str:
        return f"{(run_dir or self.storage.run_dir).rstrip('/')}/{stage}"


# ---------------------------------------------------------------------------------------------- loading
def _describe(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {err['msg']}{got_s}"


def validate(data: dict[str, Any], source: str = "config") -> RalmConfig:
    try:
        return RalmConfig.model_validate(data)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())
        raise ConfigError(f"invalid {source}:\n  {lines}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {where} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {last} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def resolve_path(name_or_path: str | Path) -> Path:
    """`demo` -> configs/demo.yaml; anything else is a path."""
    p = Path(name_or_path)
    if p.exists():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"config {str(name_or_path)!r} not found (nor {candidate})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RalmConfig:
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return validate(data, source)


def dump_config(cfg: RalmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
