"""Build the tiny model zoos: a tiny Llama base plus seven LoRA adapters (the first zoo), or a
tiny Qwen2 chat model plus two chat adapters (`--zoo chat`), all trained locally.

Usage: python ops/build_zoo.py [--out models] [--adapters NAME ...]
       python ops/build_zoo.py --zoo chat [--out models/chat-zoo]

With --adapters, only the named adapters are (re)trained, against the base and tokenizer already
in --out, and added to catalog.yaml; everything else in the zoo is left as it is. That is how the
routed reply adapters were added without touching the base and adapters already deployed.

Everything is derived from fixed seeds and synthetic data, so the zoo can be rebuilt offline
(no Hugging Face hub access) on a 2-core CPU in a few minutes. Each model has one checkable
behaviour; the script reports held-out greedy exact-match rates for all of them.

Layout written under --out:
    tiny-llama/                base model + tokenizer (base behaviour: echo the input)
    adapters/<name>/           PEFT LoRA adapters (classifier, customer-tone, partner-tone,
                               summarizer, billing-reply, technical-reply, account-reply)
    catalog.yaml               adapter catalog read by the workers
    heldout.jsonl              held-out prompts and expected greedy outputs, per model (the base
                               and the first four adapters)
    routing-heldout.jsonl      held-out labelled messages for classifier routing, each with the
                               reply adapter it should reach and that adapter's expected answer

The chat zoo (`--zoo chat`, default --out models/chat-zoo) is another architecture with its own
tokenizer and ChatML chat template, for serving `messages` jobs:
    tiny-qwen/                 Qwen2ForCausalLM (tied embeddings, grouped-query attention) +
                               tokenizer with its chat template (base behaviour: echo the user)
    adapters/<name>/           rank-16 PEFT LoRA adapters trained on chat-formatted examples
                               (ticket-label: {"label": ...}; warm-reply: a reply in a warm tone)
    catalog.yaml, heldout.jsonl (per model: messages and the expected greedy answer)
The pipelines in models/chat-zoo/pipelines/ are written by hand, not by this script.
"""

from __future__ import annotations

import os

# Never touch the Hugging Face hub: everything here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

SEED = 1234
HELD_OUT_SEED = 987_654  # a different seed, so held-out inputs come from another random stream
ROUTING_HELD_OUT_SEED = 246_810  # the routing messages get a stream of their own
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BASE_NAME = "tiny-llama"
MAX_COMPLETION_TOKENS = 64
MAX_PROMPT_TOKENS = 150
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The pipeline YAML files use exactly this template; keep it byte-for-byte identical.
PROMPT_TEMPLATE = "### Task: {task}\n### Input: {input}\n### Output: "


@dataclass(frozen=True)
class Example:
    task: str
    input: str
    target: str  # completion text, without the trailing eos

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(task=self.task, input=self.input)


@dataclass(frozen=True)
class ChatExample:
    """A chat-formatted example of the chat zoo: optional system message, one user message."""

    system: str | None
    input: str  # the user's message (held-out inputs are excluded from training by it)
    target: str  # the assistant's answer, without the trailing <|im_end|>

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.input}]

    @property
    def prompt(self) -> str:
        return render_chatml(self.messages)


Sample = Example | ChatExample


# --------------------------------------------------------------------------------------
# Synthetic data. Small word lists combined with templates; every behaviour is a simple
# function of the input, so exact match is a fair test.
# --------------------------------------------------------------------------------------

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Femi", "Gus", "Hana", "Ivan", "Jade", "Kofi"]
NAMES += ["Lena", "Mia", "Noor", "Omar", "Priya", "Rosa", "Sam", "Tariq", "Uma", "Yuki"]
GREETINGS = ["Hi", "Hello", "Hey", "Good morning", "Good afternoon", "Dear support"]
FILLERS = [
    "Thanks in advance.",
    "Please advise.",
    "This is urgent.",
    "I tried twice already.",
    "Hope you are well.",
    "Any help is welcome.",
    "I am on the free plan.",
    "",
]
# Topics are the keywords that decide the label; reply adapters echo them back.
TOPICS = {
    "billing": ["invoice", "refund", "double charge", "payment", "monthly fee", "receipt"],
    "technical": ["error message", "app crash", "login bug", "timeout", "upload failure"],
    "account": ["password", "profile", "email address", "username", "account settings"],
}
ISSUE_TEMPLATES = [
    "I have a question about my {t}.",
    "There is a problem with the {t}.",
    "Can you help me with the {t}?",
    "I need help with my {t} today.",
    "Something is wrong with the {t}.",
    "Please look into my {t}.",
]

SUBJECTS = [*NAMES, "The team", "Our manager", "The vendor", "My colleague"]
VERBS = ["shipped", "reviewed", "fixed", "tested", "moved", "signed", "cancelled"]
OBJECTS = ["the release", "the contract", "the budget", "the report", "the server"]
OBJECTS += ["the order", "the design", "the plan"]
TIMES = ["on Monday", "on Friday", "yesterday", "last week", "this morning", "today"]
TIMES += ["before noon"]


def make_message(rng: random.Random, label: str | None = None) -> tuple[str, str, str]:
    """A customer message; returns (text, label, topic). A given label draws only that category.

    Without a label the random stream is consumed exactly as before labels could be given, so
    every existing behaviour (and the tokenizer corpus) still sees the same data.
    """
    if label is None:
        label = rng.choice(sorted(TOPICS))
    topic = rng.choice(TOPICS[label])
    parts = [
        f"{rng.choice(GREETINGS)}, this is {rng.choice(NAMES)}.",
        rng.choice(ISSUE_TEMPLATES).format(t=topic),
        rng.choice(FILLERS),
    ]
    if rng.random() < 0.5:  # vary where the keyword sits
        parts[0], parts[1] = parts[1], parts[0]
    return " ".join(p for p in parts if p), label, topic


def make_report(rng: random.Random) -> str:
    """2-4 short sentences of a status report."""
    n = rng.randint(2, 4)
    # No word repeats within a report: a 2-layer model copies by matching context, and
    # "X fixed the plan ... Y fixed the plan" would leave it guessing which copy it is in.
    columns = [rng.sample(words, n) for words in (SUBJECTS, VERBS, OBJECTS, TIMES)]
    return " ".join(f"{s} {v} {o} {t}." for s, v, o, t in zip(*columns, strict=True))


def make_classifier(rng: random.Random) -> Example:
    text, label, _ = make_message(rng)
    return Example("classify", text, json.dumps({"label": label}))


def make_customer_tone(rng: random.Random) -> Example:
    text, _, topic = make_message(rng)
    reply = f"Hi there! Thanks so much for reaching out about your {topic}. We're happy to help!"
    return Example("reply", text, reply)


def make_partner_tone(rng: random.Random) -> Example:
    text, _, topic = make_message(rng)
    reply = f"Dear partner, we acknowledge your message regarding the {topic}. Kind regards."
    return Example("reply", text, reply)


def make_summarizer(rng: random.Random) -> Example:
    text = make_report(rng)
    first_sentence = text.split(". ")[0].rstrip(".") + "."
    return Example("summarize", text, json.dumps({"summary": first_sentence}))


# Also feeds the base's echo data and so the tokenizer corpus: adding a maker here would
# change the base model. The routed replies below are deliberately not in this list.
ADAPTER_MAKERS = [make_classifier, make_customer_tone, make_partner_tone, make_summarizer]

# Classifier routing: the support pipeline classifies a message, then replies with the adapter of
# that label. Each reply is a fixed sentence around the message's topic keyword. The wording only
# uses tokens the base was trained to emit (its echo targets): words such as "reply", "here" or
# "fix" tokenize to pieces no training target ever contained, whose lm_head rows a LoRA cannot
# train (see make_echo_training). These texts are not in the tokenizer corpus either.
ROUTED_REPLIES = {
    "billing": "Billing team update. We are checking the {topic} on your account and will correct"
    " any charge.",
    "technical": "Tech support update. We are investigating the {topic} and will send a patch"
    " soon.",
    "account": "Account team update. We have reset your {topic}. Please log in again.",
}


def routed_reply_adapter(label: str) -> str:
    return f"{label}-reply"


def make_routed_reply(label: str) -> Callable[[random.Random], Example]:
    """The reply adapter of one label: trained on messages of that category only, since the
    classifier routes nothing else to it."""

    def make(rng: random.Random) -> Example:
        text, _, topic = make_message(rng, label)
        return Example("reply", text, ROUTED_REPLIES[label].format(topic=topic))

    return make


def make_echo(rng: random.Random) -> Example:
    """Base behaviour: repeat the input verbatim, for any of the three task names."""
    task = rng.choice(["classify", "reply", "summarize"])
    text = make_message(rng)[0] if rng.random() < 0.5 else make_report(rng)
    return Example(task, text, text)


def make_echo_training(rng: random.Random) -> Example:
    """Echo data for training: real inputs, plus 20% echoes of the adapters' answer texts.

    A token that is never a training target ends up with an lm_head row like every other unused
    token's, and a LoRA (which cannot touch lm_head) then picks it by a hair's margin (seen:
    right argmax at p~0.05). Echoing the JSON and canned replies gives those tokens real output
    embeddings; it teaches no adapter skill, since the input already is the answer.
    """
    if rng.random() < 0.8:
        return make_echo(rng)
    answer = rng.choice(ADAPTER_MAKERS)(rng)
    return Example(rng.choice(["classify", "reply", "summarize"]), answer.target, answer.target)


@dataclass(frozen=True)
class Behaviour:
    name: str
    make: Callable[[random.Random], Sample]  # the distribution that is evaluated
    steps: int
    lr: float
    make_training: Callable[[random.Random], Sample] | None = None  # if it differs from make

    def training_example(self, rng: random.Random) -> Sample:
        return (self.make_training or self.make)(rng)


BASE_BEHAVIOUR = Behaviour("echo", make_echo, steps=3000, lr=3e-3, make_training=make_echo_training)
ADAPTER_BEHAVIOURS = [
    Behaviour("classifier", make_classifier, steps=300, lr=3e-3),
    Behaviour("customer-tone", make_customer_tone, steps=300, lr=3e-3),
    Behaviour("partner-tone", make_partner_tone, steps=300, lr=3e-3),
    Behaviour("summarizer", make_summarizer, steps=300, lr=3e-3),
]
# Trained exactly as the adapters above, but kept out of ADAPTER_BEHAVIOURS, which the tokenizer
# corpus is drawn from: a full rebuild must reproduce the existing base and tokenizer.
ROUTED_REPLY_BEHAVIOURS = [
    Behaviour(routed_reply_adapter(label), make_routed_reply(label), steps=300, lr=3e-3)
    for label in ROUTED_REPLIES
]
ALL_ADAPTER_BEHAVIOURS = [*ADAPTER_BEHAVIOURS, *ROUTED_REPLY_BEHAVIOURS]
HELD_OUT_SIZE = {"classifier": 120}  # the classifier gets more; everything else uses 60
DEFAULT_HELD_OUT = 60
ROUTING_HELD_OUT_SIZE = 120  # 40 per label


def held_out_examples(behaviour: Behaviour) -> list[Example]:
    if behaviour in ROUTED_REPLY_BEHAVIOURS:
        # Its share of routing-heldout.jsonl, so the reply figures and the routing figures
        # measure the same messages.
        return [
            Example("reply", text, reply)
            for text, label, reply in routing_held_out()
            if routed_reply_adapter(label) == behaviour.name
        ]
    rng = random.Random(f"{HELD_OUT_SEED}-{behaviour.name}")
    n = HELD_OUT_SIZE.get(behaviour.name, DEFAULT_HELD_OUT)
    return [behaviour.make(rng) for _ in range(n)]


def training_stream(behaviour: Behaviour, exclude: set[str]) -> Iterator[Sample]:
    """The endless stream of training examples, skipping held-out inputs."""
    rng = random.Random(f"{SEED}-{behaviour.name}")
    while True:
        ex = behaviour.training_example(rng)
        if ex.input not in exclude:
            yield ex


def training_inputs(behaviour: Behaviour, batch_size: int = 16) -> set[str]:
    """Every input `train` shows `behaviour`, found by replaying its stream (no model needed)."""
    exclude = {ex.input for ex in held_out_examples(behaviour)}
    stream = training_stream(behaviour, exclude)
    return {next(stream).input for _ in range(behaviour.steps * batch_size)}


@functools.cache
def routing_held_out() -> list[tuple[str, str, str]]:
    """(message, label, expected reply) rows, labels in turn so that they are balanced.

    The classifier's training could not exclude these (it predates them and must stay
    byte-identical), so they are drawn from their own seed and any message that the base or an
    original adapter was trained on is skipped; the reply adapters exclude them as held-out.
    """
    seen = set().union(*(training_inputs(b) for b in [BASE_BEHAVIOUR, *ADAPTER_BEHAVIOURS]))
    rng = random.Random(f"{ROUTING_HELD_OUT_SEED}-routing")
    labels = sorted(TOPICS)
    rows: list[tuple[str, str, str]] = []
    while len(rows) < ROUTING_HELD_OUT_SIZE:
        label = labels[len(rows) % len(labels)]
        text, _, topic = make_message(rng, label)
        if text not in seen:
            seen.add(text)  # no duplicates either
            rows.append((text, label, ROUTED_REPLIES[label].format(topic=topic)))
    return rows


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def tokenizer_corpus(behaviours: list[Behaviour], seed: str) -> list[str]:
    rng = random.Random(seed)
    examples = [b.training_example(rng) for b in behaviours for _ in range(800)]
    return [ex.prompt + ex.target for ex in examples]


def train_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE; the special tokens get the first ids, in order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    corpus = tokenizer_corpus([BASE_BEHAVIOUR, *ADAPTER_BEHAVIOURS], f"{SEED}-tokenizer")
    tok = train_bpe(corpus, vocab_size, [BOS, EOS, PAD])  # ids 0, 1, 2
    # Prepend <s> inside tokenizer.json so HF and vLLM tokenize prompts identically.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,  # decoding must return the exact bytes
    )


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def encode_example(tokenizer: PreTrainedTokenizerBase, ex: Sample) -> tuple[list[int], list[int]]:
    """Token ids and labels; the prompt is masked (-100) so only the completion is learned.

    The first zoo's tokenizer starts the prompt with <s>; the chat zoo's adds nothing, its chat
    template's text is the whole prompt (as vLLM's chat path tokenizes it)."""
    prompt_ids = tokenizer(ex.prompt)["input_ids"]
    completion_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    completion_ids.append(tokenizer.eos_token_id)  # teach the model to stop by itself
    assert len(prompt_ids) <= MAX_PROMPT_TOKENS, ex
    assert len(completion_ids) <= MAX_COMPLETION_TOKENS, ex
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def batches(
    tokenizer: PreTrainedTokenizerBase,
    behaviour: Behaviour,
    batch_size: int,
    exclude: set[str],
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded batches of fresh examples, skipping held-out inputs."""
    stream = training_stream(behaviour, exclude)
    while True:
        rows = [encode_example(tokenizer, next(stream)) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    behaviour: Behaviour,
    exclude: set[str],
    batch_size: int = 16,
) -> float:
    """AdamW with warmup + cosine decay over fresh synthetic batches, never showing an input in
    `exclude` (the held-out ones); returns seconds taken."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=behaviour.lr, weight_decay=0.0)
    warmup = max(1, behaviour.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, behaviour.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    data = batches(tokenizer, behaviour, batch_size, exclude)
    for step in range(behaviour.steps):
        loss = model(**next(data)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, behaviour.steps // 5) == 0:
            print(f"  [{behaviour.name}] step {step + 1}/{behaviour.steps} loss {losses[-1]:.4f}")
    model.eval()
    final = sum(losses[-20:]) / len(losses[-20:])
    took = time.perf_counter() - start
    print(f"  [{behaviour.name}] {behaviour.steps} steps in {took:.1f} s, final loss {final:.4f}")
    return took


# --------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def first_held_out_inputs(behaviour: Behaviour) -> set[str]:
    return {ex.input for ex in held_out_examples(behaviour)}


def train_base(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    behaviour: Behaviour,
    exclude: set[str],
    out_dir: Path,
) -> None:
    """Fully train a fresh base model on `behaviour`, then save it with its tokenizer."""
    train(model, tokenizer, behaviour, exclude)
    # Greedy by default: no sampling knobs, so HF and vLLM defaults agree.
    model.generation_config = GenerationConfig(
        do_sample=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_COMPLETION_TOKENS,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_base(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention rejects head_dim 16; 64 works
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    seed_everything(SEED)
    model = LlamaForCausalLM(config)
    train_base(model, tokenizer, BASE_BEHAVIOUR, first_held_out_inputs(BASE_BEHAVIOUR), out_dir)


def build_adapter(
    base_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    b: Behaviour,
    out: Path,
    exclude: set[str],
    rank: int = 8,
) -> float:
    """Train one LoRA adapter on the saved base; returns its training time in seconds."""
    # Reload the saved base each time so every adapter starts from identical weights.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    seed_everything(SEED)  # LoRA A matrices are randomly initialised
    model = get_peft_model(base, lora)
    took = train(model, tokenizer, b, exclude)
    # A relative name, not this machine's path: workers resolve it via catalog.yaml.
    model.peft_config["default"].base_model_name_or_path = base_dir.name
    # save_embedding_layers=False skips peft's hub lookup of "tiny-llama" (we never resize).
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    # peft keeps target_modules as a set, so its JSON order follows the string hash seed;
    # sort it so that rebuilding the zoo gives byte-identical files.
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return took


def write_samples(out_dir: Path, per_model: int = 10) -> None:
    """Held-out prompts with expected greedy outputs, for tests of the serving path.

    The models only know the synthetic input distribution; hand-written inputs can fail. Only the
    base and the original adapters: the routed replies have routing-heldout.jsonl instead.
    """
    models = {BASE_NAME: BASE_BEHAVIOUR} | {b.name: b for b in ADAPTER_BEHAVIOURS}
    with (out_dir / "heldout.jsonl").open("w") as f:
        for model_name, behaviour in models.items():
            for ex in held_out_examples(behaviour)[:per_model]:
                row = {"model": model_name, "task": ex.task, "input": ex.input}
                row |= {"prompt": ex.prompt, "expected": ex.target}
                f.write(json.dumps(row) + "\n")


def write_routing_held_out(out_dir: Path) -> None:
    """The routing demo's held-out set: the classifier should answer `label`, and `adapter`
    (the reply adapter of that label) should answer `expected_reply`, both greedily."""
    with (out_dir / "routing-heldout.jsonl").open("w") as f:
        for text, label, reply in routing_held_out():
            row = {"input": text, "label": label, "adapter": routed_reply_adapter(label)}
            f.write(json.dumps(row | {"expected_reply": reply}) + "\n")


def write_catalog(out_dir: Path, entries: list[dict[str, str]], base_name: str = BASE_NAME) -> None:
    lines = [
        "# Adapter catalog: every adapter a worker may serve. Written by ops/build_zoo.py.",
        f"base_model: {base_name}",
        "adapters:",
    ]
    for entry in entries:
        lines += [
            f"  - name: {entry['name']}",
            f"    version: {json.dumps(entry['version'])}",
            f"    path: {entry['path']}      # relative to this file",
        ]
    (out_dir / "catalog.yaml").write_text("\n".join(lines) + "\n")


def catalog_entry(name: str) -> dict[str, str]:
    return {"name": name, "version": "1", "path": f"adapters/{name}"}


def add_to_catalog(out_dir: Path, names: list[str]) -> None:
    """Append `names` to the existing catalog; existing entries keep their order and version
    (workers key their adapter caches on the version, so a rewrite must not bump it)."""
    catalog = yaml.safe_load((out_dir / "catalog.yaml").read_text())
    if catalog.get("base_model") != BASE_NAME:
        raise SystemExit(f"catalog.yaml is for base {catalog.get('base_model')!r}, not {BASE_NAME}")
    entries = [{k: str(v) for k, v in e.items()} for e in catalog.get("adapters") or []]
    for entry in entries:
        if set(entry) != {"name", "version", "path"}:
            raise SystemExit(f"catalog.yaml entry with fields this script cannot keep: {entry}")
    known = {e["name"] for e in entries}
    write_catalog(out_dir, entries + [catalog_entry(n) for n in names if n not in known])


# --------------------------------------------------------------------------------------
# Evaluation on the artifacts as written to disk
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    text: str
    # Smallest top-1 minus top-2 logit gap along the greedy path. A wide gap means another
    # engine (vLLM) with slightly different float rounding picks the same tokens.
    min_margin: float


@torch.inference_mode()
def greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str) -> Generation:
    """Greedy completion; one unpadded prompt at a time, as the vLLM oracle compares it."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=MAX_COMPLETION_TOKENS,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new_ids = out.sequences[0, input_ids.shape[1] :].tolist()
    top2 = torch.cat(out.logits).topk(2, dim=-1).values
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if not new_ids or new_ids[-1] != tokenizer.eos_token_id:
        text += " <no eos>"  # never stopping counts as wrong: it would run to max_tokens
    return Generation(text, (top2[:, 0] - top2[:, 1]).min().item())


@dataclass(frozen=True)
class Score:
    exact_match: float
    n: int
    min_margin: float


def score(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Sample]
) -> Score:
    gens = [greedy(model, tokenizer, ex.prompt) for ex in examples]
    hits = sum(g.text == ex.target for g, ex in zip(gens, examples, strict=True))
    return Score(hits / len(examples), len(examples), min(g.min_margin for g in gens))


@dataclass(frozen=True)
class RoutingScore:
    classifier_accuracy: float  # the classifier's JSON label equals the message's label
    end_to_end: float  # ... and the reply adapter it picked answers exactly the expected reply
    n: int


def classified_label(text: str) -> str | None:
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    return answer.get("label") if isinstance(answer, dict) else None


def score_routing(model: PeftModel, tokenizer: PreTrainedTokenizerBase) -> RoutingScore:
    """The support pipeline on routing-heldout: classify, then reply with the chosen adapter."""
    rows = routing_held_out()
    labels_right = replies_right = 0
    for text, label, reply in rows:
        model.set_adapter("classifier")
        predicted = classified_label(
            greedy(model, tokenizer, PROMPT_TEMPLATE.format(task="classify", input=text)).text
        )
        labels_right += predicted == label
        if predicted not in ROUTED_REPLIES:
            continue  # a broken label routes nowhere
        model.set_adapter(routed_reply_adapter(predicted))
        prompt = PROMPT_TEMPLATE.format(task="reply", input=text)
        replies_right += greedy(model, tokenizer, prompt).text == reply
    return RoutingScore(labels_right / len(rows), replies_right / len(rows), len(rows))


def evaluate(
    out_dir: Path, behaviours: list[Behaviour], with_base: bool
) -> tuple[dict[str, Score], RoutingScore | None]:
    """Load base + adapters from disk, measure held-out exact match of `behaviours` (and of the
    base if `with_base`), show side-by-side samples, and score routing if its adapters exist."""
    base_dir = out_dir / BASE_NAME
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    results = (
        {BASE_NAME: score(base, tokenizer, held_out_examples(BASE_BEHAVIOUR))} if with_base else {}
    )

    # Every adapter on disk, so routing can use the classifier when only replies were trained.
    on_disk = [
        b.name
        for b in ALL_ADAPTER_BEHAVIOURS
        if (out_dir / "adapters" / b.name / "adapter_config.json").exists()
    ]
    first, *rest = on_disk
    model = PeftModel.from_pretrained(base, out_dir / "adapters" / first, first)
    for name in rest:
        model.load_adapter(out_dir / "adapters" / name, adapter_name=name)
    model.eval()
    for b in behaviours:
        model.set_adapter(b.name)
        results[b.name] = score(model, tokenizer, held_out_examples(b))

    # The same held-out prompts through the base and every evaluated adapter of that task.
    for task in ["classify", "reply", "summarize"]:
        task_adapters = [b for b in behaviours if held_out_examples(b)[0].task == task]
        if not task_adapters:
            continue
        for ex in held_out_examples(task_adapters[0])[:2]:
            print(f"\n--- task {task}: input {ex.input!r}")
            with model.disable_adapter():
                print(f"  {BASE_NAME:15s} -> {greedy(model, tokenizer, ex.prompt).text!r}")
            for b in task_adapters:
                model.set_adapter(b.name)
                print(f"  {b.name:15s} -> {greedy(model, tokenizer, ex.prompt).text!r}")

    routing_adapters = {"classifier", *(b.name for b in ROUTED_REPLY_BEHAVIOURS)}
    routing = score_routing(model, tokenizer) if routing_adapters <= set(on_disk) else None
    return results, routing


# --------------------------------------------------------------------------------------
# The chat zoo: a tiny Qwen2 with a ChatML chat template and two rank-16 chat adapters
# --------------------------------------------------------------------------------------

CHAT_BASE_NAME = "tiny-qwen"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_VOCAB_SIZE = 640  # not the first zoo's 512: the same-base check must tell them apart
CHAT_RANK = 16
# ChatML, as Qwen2 models write it (without Qwen's default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A pipeline may set one of these as its system message; 30% of examples carry one.
CHAT_SYSTEM_MESSAGES = ["You are a helpful support assistant.", "Answer the customer."]


def render_chatml(messages: list[dict[str, str]]) -> str:
    """CHAT_TEMPLATE with the generation prompt, in Python (the build checks they agree)."""
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return f"{turns}{IM_START}assistant\n"


def chat_example(rng: random.Random, text: str, target: str) -> ChatExample:
    system = rng.choice(CHAT_SYSTEM_MESSAGES) if rng.random() < 0.3 else None
    return ChatExample(system, text, target)


def make_chat_label(rng: random.Random) -> ChatExample:
    text, label, _ = make_message(rng)
    return chat_example(rng, text, json.dumps({"label": label}))


def make_warm_reply(rng: random.Random) -> ChatExample:
    text, _, topic = make_message(rng)
    return chat_example(rng, text, f"Thanks for writing about your {topic}! We will sort it out.")


def make_chat_echo(rng: random.Random) -> ChatExample:
    """Base behaviour: answer with the user's message, verbatim."""
    text = make_message(rng)[0] if rng.random() < 0.5 else make_report(rng)
    return chat_example(rng, text, text)


def make_chat_echo_training(rng: random.Random) -> ChatExample:
    """As make_echo_training: 20% echoes of the adapters' answers, so that their tokens are
    trained as outputs (the tied embeddings help only for tokens the inputs contain)."""
    if rng.random() < 0.8:
        return make_chat_echo(rng)
    answer = rng.choice([make_chat_label, make_warm_reply])(rng).target
    return chat_example(rng, answer, answer)


CHAT_BASE_BEHAVIOUR = Behaviour(
    "chat-echo", make_chat_echo, steps=5000, lr=3e-3, make_training=make_chat_echo_training
)
CHAT_ADAPTER_BEHAVIOURS = [
    Behaviour("ticket-label", make_chat_label, steps=300, lr=2e-3),
    Behaviour("warm-reply", make_warm_reply, steps=300, lr=2e-3),
]


def chat_held_out(behaviour: Behaviour, n: int = 60) -> list[ChatExample]:
    rng = random.Random(f"{HELD_OUT_SEED}-{behaviour.name}")
    return [behaviour.make(rng) for _ in range(n)]  # type: ignore[misc]


def chat_held_out_inputs(behaviour: Behaviour) -> set[str]:
    return {ex.input for ex in chat_held_out(behaviour)}


def train_chat_tokenizer() -> PreTrainedTokenizerFast:
    corpus = tokenizer_corpus(
        [CHAT_BASE_BEHAVIOUR, *CHAT_ADAPTER_BEHAVIOURS], f"{SEED}-chat-tokenizer"
    )
    # No post-processor: the chat template's text is the whole prompt, nothing is prepended.
    tok = train_bpe(corpus, CHAT_VOCAB_SIZE, [ENDOFTEXT, IM_START, IM_END])  # ids 0, 1, 2
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_chat_base(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,  # vLLM's Qwen2 takes head_dim = hidden / heads: 64, as the CPU needs
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    seed_everything(SEED)
    model = Qwen2ForCausalLM(config)
    exclude = chat_held_out_inputs(CHAT_BASE_BEHAVIOUR)
    train_base(model, tokenizer, CHAT_BASE_BEHAVIOUR, exclude, out_dir)


def check_chat_template(tokenizer: PreTrainedTokenizerBase, examples: list[ChatExample]) -> None:
    """The saved tokenizer's chat template must render exactly the prompts trained on."""
    for ex in examples:
        rendered = tokenizer.apply_chat_template(
            ex.messages, tokenize=False, add_generation_prompt=True
        )
        if rendered != ex.prompt:
            raise SystemExit(f"chat template renders {rendered!r}, trained on {ex.prompt!r}")


def write_chat_samples(out_dir: Path, per_model: int = 10) -> None:
    """Held-out messages with the expected greedy answer, per model (base and adapters)."""
    models = {CHAT_BASE_NAME: CHAT_BASE_BEHAVIOUR} | {b.name: b for b in CHAT_ADAPTER_BEHAVIOURS}
    with (out_dir / "heldout.jsonl").open("w") as f:
        for model_name, behaviour in models.items():
            for ex in chat_held_out(behaviour)[:per_model]:
                row = {"model": model_name, "messages": ex.messages, "expected": ex.target}
                f.write(json.dumps(row) + "\n")


def evaluate_chat(out_dir: Path) -> dict[str, Score]:
    base_dir = out_dir / CHAT_BASE_NAME
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    check_chat_template(tokenizer, chat_held_out(CHAT_BASE_BEHAVIOUR))
    results = {CHAT_BASE_NAME: score(base, tokenizer, chat_held_out(CHAT_BASE_BEHAVIOUR))}
    first, *rest = [b.name for b in CHAT_ADAPTER_BEHAVIOURS]
    model = PeftModel.from_pretrained(base, out_dir / "adapters" / first, first)
    for name in rest:
        model.load_adapter(out_dir / "adapters" / name, adapter_name=name)
    model.eval()
    for b in CHAT_ADAPTER_BEHAVIOURS:
        model.set_adapter(b.name)
        results[b.name] = score(model, tokenizer, chat_held_out(b))
    ex = chat_held_out(CHAT_ADAPTER_BEHAVIOURS[0])[0]
    print(f"\n--- messages {ex.messages!r}")
    with model.disable_adapter():
        print(f"  {CHAT_BASE_NAME:15s} -> {greedy(model, tokenizer, ex.prompt).text!r}")
    for b in CHAT_ADAPTER_BEHAVIOURS:
        model.set_adapter(b.name)
        print(f"  {b.name:15s} -> {greedy(model, tokenizer, ex.prompt).text!r}")
    return results


def build_chat_zoo(out_dir: Path) -> tuple[dict[str, Score], dict[str, float]]:
    """Tokenizer, base, adapters, catalog and held-out samples; pipelines/ is left alone."""
    base_dir = out_dir / CHAT_BASE_NAME
    for stale in [base_dir, out_dir / "adapters"]:
        shutil.rmtree(stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("training chat tokenizer")
    tokenizer = train_chat_tokenizer()
    print(f"training {CHAT_BASE_NAME} (vocab {len(tokenizer)}) on {CHAT_BASE_BEHAVIOUR.name}")
    build_chat_base(tokenizer, base_dir)
    train_seconds: dict[str, float] = {}
    for b in CHAT_ADAPTER_BEHAVIOURS:
        print(f"training adapter {b.name} (rank {CHAT_RANK})")
        exclude = chat_held_out_inputs(b)
        adapter_dir = out_dir / "adapters" / b.name
        train_seconds[b.name] = build_adapter(
            base_dir, tokenizer, b, adapter_dir, exclude, rank=CHAT_RANK
        )
    entries = [catalog_entry(b.name) for b in CHAT_ADAPTER_BEHAVIOURS]
    write_catalog(out_dir, entries, CHAT_BASE_NAME)
    write_chat_samples(out_dir)
    print("evaluating (HF generate, greedy, fp32, chat template, models loaded from disk)")
    return evaluate_chat(out_dir), train_seconds


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_first_zoo(
    out_dir: Path, adapters: list[str] | None
) -> tuple[dict[str, Score], dict[str, float], RoutingScore | None]:
    base_dir = out_dir / BASE_NAME
    if adapters:
        behaviours = [b for b in ALL_ADAPTER_BEHAVIOURS if b.name in adapters]
        # The tokenizer as saved, not retrained: the adapters must fit the deployed base.
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base_dir)
    else:
        behaviours = ALL_ADAPTER_BEHAVIOURS
        # Start clean so stale adapters never linger in the zoo.
        for stale in [base_dir, out_dir / "adapters"]:
            shutil.rmtree(stale, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        print("training tokenizer")
        tokenizer = train_tokenizer()
        print(f"training {BASE_NAME} (vocab {len(tokenizer)}) on {BASE_BEHAVIOUR.name}")
        build_base(tokenizer, base_dir)

    train_seconds: dict[str, float] = {}
    for b in behaviours:
        print(f"training adapter {b.name}")
        adapter_dir = out_dir / "adapters" / b.name
        shutil.rmtree(adapter_dir, ignore_errors=True)  # no stale files from an older version
        exclude = first_held_out_inputs(b)
        train_seconds[b.name] = build_adapter(base_dir, tokenizer, b, adapter_dir, exclude)
    if adapters:
        add_to_catalog(out_dir, [b.name for b in behaviours])
    else:
        write_catalog(out_dir, [catalog_entry(b.name) for b in behaviours])
        write_samples(out_dir)
    write_routing_held_out(out_dir)

    print("evaluating (HF generate, greedy, fp32, models loaded from disk)")
    results, routing = evaluate(out_dir, behaviours, with_base=not adapters)
    return results, train_seconds, routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo",
        choices=["first", "chat"],
        default="first",
        help="first: tiny-llama and its seven adapters; chat: tiny-qwen and its two chat"
        " adapters (default: first)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default: models, or models/chat-zoo with --zoo chat)",
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        choices=[b.name for b in ALL_ADAPTER_BEHAVIOURS],
        metavar="NAME",
        help="first zoo only: train only these adapters, on the base already in --out, and add"
        " them to its catalog.yaml (the base, tokenizer and other adapters stay untouched)",
    )
    args = parser.parse_args()
    out_dir: Path = args.out or Path("models/chat-zoo" if args.zoo == "chat" else "models")
    if args.adapters and args.zoo == "chat":
        parser.error("--adapters is for the first zoo only")
    if args.adapters and not (out_dir / BASE_NAME / "model.safetensors").exists():
        parser.error(f"--adapters needs a built base in {out_dir / BASE_NAME}; build it first")

    start = time.perf_counter()
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the report
    seed_everything(SEED)
    routing = None
    if args.zoo == "chat":
        results, train_seconds = build_chat_zoo(out_dir)
    else:
        results, train_seconds, routing = build_first_zoo(out_dir, args.adapters)
    print("\nheld-out greedy exact match:")
    for name, s in results.items():
        margin = f"min top-1 logit margin {s.min_margin:.2f}"
        trained = f", trained in {train_seconds[name]:.1f} s" if name in train_seconds else ""
        print(f"  {name:15s} {s.exact_match:6.1%}  (n={s.n}, {margin}{trained})")
    if routing:
        print(f"routing on routing-heldout.jsonl (n={routing.n}):")
        print(f"  classifier label accuracy      {routing.classifier_accuracy:6.1%}")
        print(f"  classify + routed reply exact  {routing.end_to_end:6.1%}")
    print(f"size of {out_dir}: {dir_size(out_dir) / 1e6:.2f} MB")
    print(f"zoo built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
