"""The ALM: frozen encoder features -> trainable `AudioFrontend` -> frozen HF causal LM fed `inputs_embeds`.

Only the frontend (layer mixers, adapters, fusion, audio start/end embeddings) trains; `assert_frozen`
checks that the LLM stays frozen. The loss is computed on response tokens only, and the LM head runs
only at those positions (the vocabulary projection elsewhere would be wasted work).

Inference for the eval helper: `ALM.generate(features, question)`; `features=None` takes the exact
text-only path of the frozen LLM (same prompt ids, same `generate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import numpy as np
import torch
from torch import nn

from ralm.config import LossAverage
from ralm.model.adapters import build_adapter
from ralm.model.chat import ChatLayout, Question
from ralm.model.fusion import build_fusion
from ralm.model.layers import AudioTokenNorm, LayerMix

IGNORE = -100
LOSS_AVERAGES = get_args(LossAverage)  # how answer tokens are averaged, see ALM.answer_loss


@dataclass
class EncoderInfo:
    """One encoder's feature layout, as the features stage writes it to `features/encoders.json`."""

    name: str
    width: int
    layers: list[int] = field(default_factory=lambda: [-1])
    frame_rate: float = 50.0
    model: str = ""
    sample_rate: int = 16000
    options: dict[str, Any] = field(default_factory=dict)  # the encoder spec's options (e.g. whisper window)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderInfo:
        known = {k: d[k] for k in ("name", "width", "layers", "frame_rate", "model", "sample_rate", "options")
                 if k in d}
        info = cls(**known)
        info.layers = list(info.layers) or [-1]
        return info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AudioFrontend(nn.Module):
    """Everything that trains: per-encoder layer mix + adapter, fusion, learned audio start/end embeddings.

    The fused audio tokens end in `AudioTokenNorm`: centred over the data (no constant soft prompt can
    hide in them) and scaled to the LLM's embedding scale (a fresh adapter emits vectors ~10x longer than
    any text token, which swamp the frozen LLM's residual stream)."""

    def __init__(self, encoders: list[EncoderInfo], llm_dim: int, adapter: str = "downsampler",
                 adapter_hidden: int = 1024, fusion: str = "sum", fusion_options: dict[str, Any] | None = None,
                 init_std: float = 0.02):
        super().__init__()
        if not encoders:
            raise ValueError("the ALM needs at least one encoder")
        self.encoders = list(encoders)
        self.mixers = nn.ModuleDict({e.name: LayerMix(len(e.layers)) for e in encoders})
        self.adapters = nn.ModuleDict({e.name: build_adapter(adapter, e.width, llm_dim, adapter_hidden)
                                       for e in encoders})
        self.fusion = build_fusion(fusion, [e.name for e in encoders], llm_dim, **(fusion_options or {}))
        self.audio_start = nn.Parameter(torch.randn(llm_dim) * init_std)
        self.audio_end = nn.Parameter(torch.randn(llm_dim) * init_std)
        self.out_norm = AudioTokenNorm(llm_dim, init_std)

    def forward(self, features: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features[name]: (B, L, T, d); lengths[name]: (B,) -> audio tokens (B, T', D) and their lengths."""
        streams = {}
        for e in self.encoders:
            if e.name not in features:
                raise KeyError(f"features of encoder {e.name!r} missing (got {sorted(features)})")
            adapter = self.adapters[e.name]
            x, n = adapter(self.mixers[e.name](features[e.name]), lengths[e.name])
            streams[e.name] = (x, n, e.frame_rate / adapter.stride)
        audio, n = self.fusion(streams)
        return self.out_norm(audio, n), n


class ALM(nn.Module):
    def __init__(self, llm: nn.Module, tokenizer: Any, frontend: AudioFrontend, layout: ChatLayout,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.llm, self.tokenizer, self.frontend, self.layout = llm, tokenizer, frontend, layout
        self.meta = dict(meta or {})
        self.llm.requires_grad_(False)
        self.llm.eval()

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, llm_path: str, encoders: list[EncoderInfo | dict[str, Any]], *, adapter: str = "downsampler",
              adapter_hidden: int = 1024, fusion: str = "sum", fusion_options: dict[str, Any] | None = None,
              system_prompt: str | None = None, llm_name: str | None = None,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int | None = 0) -> ALM:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        encs = [e if isinstance(e, EncoderInfo) else EncoderInfo.from_dict(e) for e in encoders]
        tok = AutoTokenizer.from_pretrained(llm_path)
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype).to(device)
        emb = llm.get_input_embeddings().weight
        if seed is not None:
            torch.manual_seed(seed)  # same initial adapter on every worker
        frontend = AudioFrontend(encs, emb.shape[1], adapter, adapter_hidden, fusion, fusion_options,
                                 init_std=float(emb.detach().float().std())).to(device)
        meta = {"llm": llm_name or llm_path, "llm_path": llm_path, "encoders": [e.to_dict() for e in encs],
                "adapter": adapter, "adapter_hidden": adapter_hidden, "fusion": fusion,
                "fusion_options": dict(fusion_options or {}), "system_prompt": system_prompt}
        return cls(llm, tok, frontend, ChatLayout(tok, system_prompt), meta)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def encoders(self) -> list[EncoderInfo]:
        return self.frontend.encoders

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.frontend.parameters() if p.requires_grad]

    def assert_frozen(self) -> None:
        trainable = [n for n, p in self.llm.named_parameters() if p.requires_grad]
        if trainable:
            raise AssertionError(f"the LLM must stay frozen; trainable: {trainable[:5]}")

    # ------------------------------------------------------------------------------------------ text
    def encode_text(self, prompt: str, target: str | None = None) -> tuple[list[int], list[int]]:
        """(suffix ids, target ids) of one sample; the prefix is shared (`layout.prefix_ids`)."""
        suffix = self.layout.suffix_ids(prompt)
        return suffix, (self.layout.target_ids(target, prompt) if target is not None else [])

    def audio_token_count(self, frames: dict[str, int]) -> int:
        """Audio tokens (start/end included) for clips with these frame counts, without running the model."""
        main = self.encoders[0]
        n = int(self.frontend.adapters[main.name].out_lengths(torch.tensor([frames[main.name]]))[0])
        extra = getattr(self.frontend.fusion, "num_latents", 0) * (len(self.encoders) - 1)
        return n + extra + 2

    # ------------------------------------------------------------------------------------------ splicing
    def assemble(self, audio: torch.Tensor | None, audio_lens: torch.Tensor | None, suffix_ids: list[list[int]],
                 target_ids: list[list[int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: prefix | <start> audio <end> | suffix | target, right-padded.

        Returns inputs_embeds (B, S, D), attention_mask (B, S), labels (B, S) with IGNORE outside targets.
        """
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        bsz = len(suffix_ids)
        targets = target_ids or [[] for _ in range(bsz)]
        prefix = self.layout.prefix_ids
        texts = [s + t for s, t in zip(suffix_ids, targets, strict=True)]
        flat = torch.tensor(prefix + [i for t in texts for i in t], dtype=torch.long, device=self.device)
        flat_emb = embed(flat)
        pre_emb, rest = flat_emb[: len(prefix)], flat_emb[len(prefix):]
        seqs, labels, offset = [], [], 0
        for i in range(bsz):
            text_emb = rest[offset: offset + len(texts[i])]
            offset += len(texts[i])
            parts = [pre_emb]
            if audio is not None:
                n = int(audio_lens[i])
                parts += [self.frontend.audio_start[None].to(dtype), audio[i, :n].to(dtype),
                          self.frontend.audio_end[None].to(dtype)]
            parts.append(text_emb)
            seq = torch.cat(parts)
            lab = torch.full((seq.shape[0],), IGNORE, dtype=torch.long)
            if targets[i]:
                lab[-len(targets[i]):] = torch.tensor(targets[i])
            seqs.append(seq)
            labels.append(lab)
        width = max(s.shape[0] for s in seqs)
        emb = torch.zeros(bsz, width, seqs[0].shape[1], dtype=dtype, device=self.device)
        mask = torch.zeros(bsz, width, dtype=torch.long, device=self.device)
        lab_t = torch.full((bsz, width), IGNORE, dtype=torch.long, device=self.device)
        for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
            emb[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
            lab_t[i, : s.shape[0]] = lab
        return emb, mask, lab_t

    def answer_loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    average: str = "token") -> tuple[torch.Tensor, int]:
        """Next-token cross-entropy over the labelled positions; the LM head runs only there. `average`:
        `token` = the mean over every answer token of the batch (long answers weigh more); `sample` = each
        answer's own mean, then the mean over answers (a 6-token "The speaker sounds male." weighs as much
        as a 40-token instruction answer, so the one word the audio decides is not drowned out)."""
        if average not in LOSS_AVERAGES:
            raise ValueError(f"loss average must be one of {LOSS_AVERAGES}, got {average!r}")
        hidden = self.llm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
        nxt = labels[:, 1:]
        sel = nxt != IGNORE
        count = int(sel.sum())
        if count == 0:
            return hidden.sum() * 0.0, 0
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][sel]).float()
        if average == "token":
            return nn.functional.cross_entropy(logits, nxt[sel]), count
        per_token = nn.functional.cross_entropy(logits, nxt[sel], reduction="none")
        rows = sel.nonzero()[:, 0]
        sums = per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)
        counts = sel.sum(1)
        has = counts > 0
        return (sums[has] / counts[has]).mean(), count

    def loss(self, batch: dict[str, Any], frontend: nn.Module | None = None, average: str = "token"
             ) -> tuple[torch.Tensor, int]:
        """Training loss of a collated batch (see `ralm.train.data.collate`). `frontend` may be the
        DeepSpeed engine wrapping `self.frontend`; `average` as in `answer_loss`."""
        dtype = self.frontend.audio_start.dtype  # bf16 when DeepSpeed runs the frontend in bf16 (GPU)
        feats = {k: v.to(self.device, dtype) for k, v in batch["features"].items()}
        lens = {k: v.to(self.device) for k, v in batch["feature_lens"].items()}
        audio, audio_lens = (frontend or self.frontend)(feats, lens)
        emb, mask, labels = self.assemble(audio, audio_lens, batch["suffix_ids"], batch["target_ids"])
        return self.answer_loss(emb, mask, labels, average)

    # ------------------------------------------------------------------------------------------ inference
    def features_to_tensors(self, features: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor],
                                                                           dict[str, torch.Tensor]]:
        """One clip's {encoder: (layers, frames, width)} arrays -> batched tensors of one."""
        feats, lens = {}, {}
        for e in self.encoders:
            if e.name not in features:
                raise KeyError(f"features of encoder {e.name!r} missing (got {sorted(features)})")
            arr = np.asarray(features[e.name])
            if arr.ndim == 2:
                arr = arr[None]
            if arr.shape[0] != len(e.layers) or arr.shape[2] != e.width:
                raise ValueError(f"{e.name}: expected (layers={len(e.layers)}, frames, width={e.width}), "
                                 f"got {arr.shape}")
            feats[e.name] = torch.from_numpy(arr.astype(np.float32))[None].to(self.device,
                                                                              self.frontend.audio_start.dtype)
            lens[e.name] = torch.tensor([arr.shape[1]], device=self.device)
        return feats, lens

    @torch.no_grad()
    def embed_audio(self, features: dict[str, np.ndarray]) -> torch.Tensor:
        """The audio block of one clip, start/end embeddings included: (T' + 2, D). For ensembles."""
        audio, n = self.frontend(*self.features_to_tensors(features))
        dtype = self.llm.get_input_embeddings().weight.dtype
        return torch.cat([self.frontend.audio_start[None], audio[0, : int(n[0])], self.frontend.audio_end[None]]
                         ).to(dtype)

    @torch.no_grad()
    def embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.llm.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def build_inputs(self, features: dict[str, np.ndarray] | None, question: Question
                     ) -> dict[str, torch.Tensor]:
        """Generation inputs of one question: `input_ids` (text only) or `inputs_embeds` (with audio)."""
        if features is None:
            ids = torch.tensor([self.layout.text_prompt_ids(question)], device=self.device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        head, tail = self.layout.around_audio(question)
        emb = torch.cat([self.embed_ids(head), self.embed_audio(features), self.embed_ids(tail)])[None]
        return {"inputs_embeds": emb, "attention_mask": torch.ones(emb.shape[:2], dtype=torch.long,
                                                                    device=self.device)}

    @torch.no_grad()
    def generate_from_inputs(self, inputs: dict[str, torch.Tensor], max_new_tokens: int = 256,
                             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.95) -> str:
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy,
                              "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if not greedy:
            kw.update(temperature=temperature, top_p=top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        out = self.llm.generate(**inputs, **kw)
        if "input_ids" in inputs:  # decoder-only generate returns prompt + new tokens for ids
            out = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(out[0], skip_special_tokens=True)

    def generate(self, features: dict[str, np.ndarray] | None, question: str, max_new_tokens: int = 256,
                 greedy: bool = True, temperature: float = 0.7, top_p: float = 0.95) -> str:
        """Answer `question` about a clip (features: {encoder: (layers, frames, width)}) or, with
        `features=None`, exactly as the frozen LLM alone would."""
        return self.generate_from_inputs(self.build_inputs(features, question), max_new_tokens, greedy,
                                         temperature, top_p)
