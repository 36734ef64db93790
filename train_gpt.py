"""
slowrun: data-efficient language-model pretraining in one file.

The training data is fixed (about 100M FineWeb tokens, read for many epochs) and compute is nearly free:
the question is how low the validation loss can go. Read this file top to bottom like a paper, down to the Harness
banner: the recipe's hyperparameters (Recipe), distributed setup, data, model, optimizers and schedules, losses and
evaluation, training one member, the ensemble loop, kernels (each fast path beside its reference), main. Below the
banner, the harness, where nothing changes a number: the run settings (Hyperparameters = Recipe + where and how a run
goes), frozen models' placement, member files, checkpoints and resume, the memory plan,
logging and locks, the heartbeat watchdog, progress and ETA, data-file checks, a newcomer's outputs, record
comparison and --eval_only.

    python train_gpt.py --preset tiny                               # CPU, bundled sample, a few minutes
    torchrun --standalone --nproc_per_node=8 train_gpt.py --preset 1h
    python train_gpt.py --help                                      # a map of every flag, grouped by concept

`import train_gpt` runs nothing: tests and the companion tools (data/, records/, bench/) import from here.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import ast
import base64
import bisect
import functools
import glob
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import uuid
import weakref
import zlib
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameters: the recipe, grouped by concept (the run settings are below the harness banner)

# Value kinds: each numeric field below names the range it accepts as its annotation (`muon_lr: Positive = 0.02`).
# A kind is its default's own type (parsing is unchanged); check_numbers refuses any value outside its kind's range,
# and a plain float that is not finite, with one line before any work.
Positive = float  # > 0 and finite: learning rates, eps, bases, ratios, temperatures, timeouts
NonNegative = float  # >= 0 and finite: weight decays, noise, loss weights, clips (0 is usually "off")
Fraction = float  # in [0, 1): betas, momentums, decays, dropout, a start point that must come before the end
Probability = float  # in [0, 1]: fractions of training, mixing weights
Count = int  # >= 0: token and step counts, sizes where 0 means "off" or "all"
PositiveInt = int  # >= 1: sizes, periods, numbers of things there must be at least one of
Interval = int  # >= -1: steps between events, 0 the default cadence, -1 never
Seed = int  # in [0, 2^63): torch and numpy seeds
Seed32 = int  # in [0, 2^32): numpy RandomState seeds
NUMBER_KINDS: dict[str, tuple[str, object]] = {  # kind -> (what check_numbers says, the test a value must pass)
    "Positive": ("be > 0 and finite", lambda v: 0 < v < math.inf),
    "NonNegative": ("be >= 0 and finite", lambda v: 0 <= v < math.inf),
    "Fraction": ("lie in [0, 1)", lambda v: 0 <= v < 1),
    "Probability": ("lie in [0, 1]", lambda v: 0 <= v <= 1),
    "Count": ("be >= 0", lambda v: v >= 0),
    "PositiveInt": ("be >= 1", lambda v: v >= 1),
    "Interval": ("be >= -1", lambda v: v >= -1),
    "Seed": ("lie in [0, 2^63)", lambda v: 0 <= v < 2**63),
    "Seed32": ("lie in [0, 2^32)", lambda v: 0 <= v < 2**32),
    "float": ("be finite", math.isfinite),  # a float field that names no kind: any finite number
    "int": ("be a whole number", lambda v: True),
}


@dataclass
class Recipe:
    """Every setting that decides a run's numbers, grouped by what it does. Defaults are a GPT-2-small-sized plain
    model; presets below override them; any field can be set on the command line (`--n_layer 4`). A trick's flag at
    its default leaves the plain code path untouched. Where and how a run goes (device, memory plan, run folder,
    checkpoints, logging) are the run settings: Hyperparameters(Recipe), below the harness banner, which the command
    line fills just as flatly (`--device cpu`)."""

    preset: str = ""  # name of the preset applied before the command-line overrides ("" = none); see PRESETS
    # --- data: the fixed budget, read for many epochs -------------------------------------------------------------
    train_files: str = "data/fineweb/fineweb_train.bin"  # glob of train shards: the fixed budget, read for many epochs
    val_files: str = "data/fineweb/fineweb_val.bin"  # glob of validation shards, scored whole at each evaluation
    test_files: str = ""  # glob of held-out test shards, scored once at the end ("" = none); never used to choose
    train_tokens: Count = 0  # train on only the first N train tokens, cut back to a document start (0 = all): data-scaling curves
    val_tokens: Count = 0  # score only the first N validation tokens (0 = all of them)
    train_order: str = "docs"  # docs: whole documents reshuffled every epoch | fixed: the unshuffled stream's seq_len + 1 windows permuted once by numpy RandomState(43), the same order every epoch (the slowrun baseline record's prepared data, records/TRACKS.md F18a)
    vocab_size: PositiveInt = 50304  # GPT-2's 50,257 tokens padded to a multiple of 128 (faster matmuls; modded-nanogpt)
    bos_id: Count = 50256  # <|endoftext|>: every document starts with it
    tokenizer: str = "gpt2"  # what made the shards (their header says): gpt2 (BPE) | bytes (UTF-8 bytes + separator 256) | bpe (your own small BPE, --bpe_file); a mismatch is refused
    bpe_file: str = ""  # --tokenizer bpe: the ranks file data/encode.py --train_bpe wrote (its checksum must match the shards' headers)
    seed: Seed = 0  # seeds the initialisation and the data order
    # --- model (nanochat lineage, as in the public slowrun baseline) ----------------------------------------------
    n_layer: PositiveInt = 12  # transformer blocks
    n_embd: PositiveInt = 768  # residual width
    n_head: PositiveInt = 6  # attention heads; head_dim = n_embd / n_head (must be even for RoPE)
    mlp: str = "relu2"  # "relu2": ReLU(x)^2 (So et al. 2021, Primer; modded-nanogpt) | "swiglu" (Shazeer 2020; slowrun)
    mlp_ratio: Positive = 4.0  # MLP hidden width / n_embd; SwiGLU uses 2/3 of it so both have the same parameter count
    mlp_hidden: Count = 0  # MLP hidden width (0 = mlp_ratio's rule); the records use 256 * ceil(floor(8 d / 3) / 256): 4864 at d 1792
    rope_base: Positive = 10000.0  # rotary position embedding base (Su et al. 2021)
    rope_pairs: Count = 0  # partial RoPE: only the first r of the head_dim/2 frequency pairs rotate, inv_freq_j = base^(-j/r); the rest stay put (0 = all; 15min: head_dim/4 = 32)
    logit_softcap: NonNegative = 15.0  # logits = c * tanh(logits / c) (Gemma 2; slowrun uses 10); 0 = off
    dropout: Fraction = 0.0  # dropout on each residual branch's output (the slowrun baseline uses 0.1)
    dropout_mlp: bool = True  # dropout on the MLP branch too (False: the attention branch only, as the 15min record)
    proj_init: str = "zero"  # attention and MLP output projections: "zero" (nanochat) | "normal": N(0, n_embd^-0.5) (slowrun 1h record #14)
    train_vocab: Count = 0  # softmax over the first N logits in training (0 = all vocab_size): the records pad the vocabulary
    eval_vocab: Count = 0  # to 50,304 rows but score only the 50,257 real tokens (0 = all vocab_size), in evaluation
    # --- model tricks of the public records (each off by default: off is exactly the plain model) -----------------
    value_proj: bool = False  # V += 2*sigmoid(gate(x)) * W x0 on alternating layers, per head (ResFormer value residual; slowrun unlimited)
    value_embed_tables: bool = False  # V += 2*sigmoid(gate(x)) * E_l[idx] on alternating layers: a vocab x n_embd table per layer instead of value_proj's W x0 (the slowrun baseline record's value embeddings, records/TRACKS.md F17)
    unet_skips: bool = False  # decoder layer n-1-i adds w_i * (output of encoder layer i), w_i learned, 1 at init (modded-nanogpt; slowrun)
    attn_gate: bool = False  # per-head sigmoid gate on the attention output from x, zero-init (Qiu et al. 2025; modded-nanogpt; slowrun)
    out_gate_channels: PositiveInt = 32  # input channels the attention output gate reads (x[..., :C]); the 1h record uses 12
    resid_mix: bool = False  # x = lambda_r * x + lambda_0 * x0 before each block, 1 and 0.1 at init (modded-nanogpt; slowrun records)
    resid_lambda_init: float = 1.0  # initial resid_lambdas of resid_mix (15min: 1.1)
    xsa: str = ""  # Exclusive Self Attention y -= s (y.v_hat) v_hat: "" off | "fixed" (s = 1) | "learned" (s = tanh(alpha), alpha = 0)
    xsa_eps: Positive = 1e-12  # XSA's v_hat = v / max(|v|, eps) (F.normalize's eps; 15min: 1e-4)
    head_mix: bool = False  # interleaved head attention: learned H x H head-mixing matrices for Q, K, V, identity at init
    key_offset: bool = False  # on "L" layers and the last layer, after RoPE and QK-norm, the second half of each key is the previous token's (15min)
    doc_mask: bool = False  # no attention across <|endoftext|> boundaries: each token sees only its own document (modded-nanogpt)
    stochastic_depth: Fraction = 0.0  # drop a whole block per sequence with probability p * (l + 1) / n_layer (Huang et al. 2016)
    stochastic_depth_style: str = "sequence"  # "sequence": per sequence, p (l+1)/L, kept blocks rescaled | "batch": one draw per block call for the whole micro-batch, p l/(L-1), no rescale (slowrun 1h record #15)
    mtp_weight: NonNegative = 0.0  # multi-token prediction: aux head for token t+2, this loss weight (Gloeckle et al. 2024; DeepSeek-V3)
    mtp_style: str = "linear"  # with mtp_weight > 0: "linear" (h + W rms_norm(h) -> t+2) | "block": an extra Block on W [h_t ; rms_norm(wte(y_t))] predicts y_{t+1} (slowrun 1h record #16)
    mtp_offsets: str = ""  # multi-offset loss: the one lm_head's logits at t scored against targets t, t+1, ... with
    # these weights, offsets running on across sequence ends of the flattened micro-batch (15min record: "1,0.5,0.25"); "" = off
    loop_repeats: Count = 0  # looped layers: replay the layers of loop_range this many extra times (Universal Transformer; slowrun research)
    loop_range: str = ""  # "a:b": the layers [a, b) that loop_repeats replays ("" = the middle third)
    recurrence: PositiveInt = 1  # the whole layer stack runs this many times, each pass ending in rms_norm and re-reading x0; in training all passes but the last run without gradients (15min: 2)
    window_pattern: str = ""  # sliding-window attention, cycled over layers, last layer always long: e.g. "SSSL" (nanochat; slowrun)
    window_short: Count = 0  # the short ("S") window in tokens (0 = seq_len // 2, as in the slowrun records)
    yarn: bool = False  # with window_schedule: each growth of the long window rescales the RoPE frequencies (YaRN ramp, alpha 1, beta 32) and multiplies the softmax scale (from head_dim^-0.5) by 0.2 ln(new/old) + 1, as the 2h record does (Peng et al. 2023, YaRN)
    # --- optimizer: Muon for hidden matrices, AdamW for the rest (variants each off by default) -------------------
    muon_lr: Positive = 0.02  # Muon learning rate (Jordan et al. 2024); scaled by sqrt(max(1, rows/cols)) per matrix
    muon_momentum: Fraction = 0.95  # Muon momentum
    muon_nesterov: bool = True  # Nesterov momentum for Muon
    muon_ns_steps: Count = 5  # Newton-Schulz iterations of the orthogonalisation
    muon_wd: NonNegative = 0.0  # decoupled weight decay on Muon matrices: p <- p * (1 - lr * wd) (slowrun records: 1.3-1.6)
    muon_wd_scaled: bool = False  # Muon's sqrt(max(1, rows/cols)) step factor multiplies the weight decay too (slowrun records)
    cautious_wd: bool = False  # Muon weight decay only where update * param >= 0 (cautious WD, Chen et al. 2025; slowrun records)
    muon_polar_express: bool = False  # Polar Express per-iteration coefficients instead of the fixed quintic (Amsel et al. 2025; slowrun)
    muon_eq_r: bool = False  # MuonEq-R: scale each row of the momentum to unit norm before orthogonalising (MuonEq, 2025)
    normuon: bool = False  # NorMuon: per-neuron second-moment rescaling of the orthogonalised update (Li et al. 2025; slowrun)
    normuon_beta2: Fraction = 0.95  # NorMuon's second-moment EMA coefficient
    gates_muon: bool = False  # value and output gates train with Muon and its weight decay, not AdamW (slowrun 1h record)
    value_gate_muon: bool = False  # only the value gates train with Muon (output gates stay in AdamW): the slowrun baseline and 15min records
    embed_lr: Positive = 0.2  # AdamW learning rate of the token embedding (nanochat)
    head_lr: Positive = 0.004  # AdamW learning rate of the untied lm_head (nanochat)
    scalar_lr: Positive = 0.04  # AdamW learning rate of scalar and vector parameters (gates, lambdas), if the model has any
    head_mix_lr: NonNegative = 0.0  # AdamW LR of the head-mixing matrices (head_mix), WD 0 (0 = scalar_lr; slowrun 1h: 0.02)
    resid_lr_scale: Positive = 1.0  # resid lambdas and U-Net skip weights train at scalar_lr * this (slowrun 1h record: 0.01)
    adam_beta1: Fraction = 0.8  # AdamW beta1 (modded-nanogpt, nanochat)
    adam_beta2: Fraction = 0.95  # AdamW beta2
    adam_eps: Positive = 1e-10  # AdamW epsilon
    adam_wd: NonNegative = 0.0  # decoupled weight decay on the embedding and lm_head (not on scalars)
    x0_beta1: Fraction = 0.0  # AdamW beta1 of the x0 lambdas (0 = adam_beta1; slowrun 1h record: 0.96)
    xsa_betas: str = ""  # learned XSA strengths in their own AdamW group at scalar_lr with these "beta1,beta2" ("" = the scalar group; 15min: "0.9,0.95")
    out_gate_betas: str = ""  # attention output gates in their own AdamW group at scalar_lr with these "beta1,beta2" ("" = the scalar group; 15min: "0.9,0.99")
    grad_clip: NonNegative = 0.0  # clip the global gradient norm to this (0 = off)
    # --- precision: where the public records round to bf16 or fp8 (each off: fp32 weights and arithmetic) ---------
    muon_bf16: bool = False  # Muon rounded where the public slowrun records round it, on any device: the momentum orthogonalised in bf16 and kept in bf16 through NorMuon (its factor rounded to bf16; beta2 too), lr sqrt(max(1, rows/cols)) and wd rounded to bf16, the step lr * update in bf16; with the records' fp32 0-d tensor arithmetic for momentum and MuonEq-R's clamp (on the CPU: the public muon_step_fused bit for bit)
    muon_gather_bf16: bool = False  # Muon's updates rounded to bf16 and all-gathered in bf16 (half the bytes; modded-nanogpt's Muon gathers bf16 updates); every rank applies the same rounded update
    attn_qkv_bf16: bool = False  # q, k and v cast to bf16 for the attention product, its output back to the compute dtype (the 2h record's cast, two_hour/train.py; a no-op under CUDA autocast, where they are bf16 already)
    rope_tables: str = ""  # how the RoPE cos/sin tables are stored: "" float32, cast to q's dtype where they rotate (bf16 under CUDA autocast) | bf16: bf16 tensors (the 1h, 15min, unlimited and baseline records' _precompute_rotary; on CUDA the same numbers as "", on a CPU the records' rounded tables) | bf16_values: float32 tensors holding bf16-rounded values, q and k rotated in float32 (the 2h record's Yarn buffers, which its bf16 q, k meet by type promotion)
    fp8_head: bool = False  # CUDA, with mtp_offsets: the loss's lm_head matmul in fp8 e4m3 (x / (100/448), W / (1.6/448)), bf16
    # logits, logit gradients in e5m2 scaled by 448/0.75 (15min record's fused kernel); the bf16 path is the reference
    # --- batch and length of training -----------------------------------------------------------------------------
    seq_len: PositiveInt = 1024  # tokens per training sequence (each window holds seq_len + 1 tokens: inputs and targets)
    batch_tokens: PositiveInt = 524288  # tokens per optimizer step over all ranks; gradient accumulation makes up the rest
    device_batch_size: PositiveInt = 16  # sequences per rank per forward/backward (lower it if memory runs out)
    num_epochs: PositiveInt = 1  # passes over the train set
    max_steps: Count = 0  # stop after this many optimizer steps (0 = num_epochs full epochs); the LR schedule follows it
    public_steps: Count = 0  # the public records' step count: each epoch keeps a multiple of this many windows (the public DataLoader's micro-batch on 8 GPUs: device batch x 8), steps run on across epoch ends, the run is ceil(epochs x windows / batch) steps, the schedules see the public's N = round(epochs x windows / batch) and a warmdown of round(warmdown_frac x N) steps (with snapshot cycles of whole epochs and a batch_schedule: round(cycle windows / batch) steps a cycle, the unlimited record's); 0 = whole-step epochs, the last one short (the CPU tracks)
    # --- schedules: LR, weight decay, momentum, batch, windows, loops (each at its default: the plain schedule) ---
    warmup_steps: Count = 0  # linear LR warmup steps
    warmdown_frac: Probability = 0.2  # final fraction of training over which the LR decays linearly
    final_lr_frac: Probability = 0.0  # LR at the very end, as a fraction of the peak
    warmdown_shape: Positive = 1.0  # warmdown exponent: lr = final + (1 - final) * (1 - d)^shape over the warmdown (1 = linear)
    lr_cycles: Count = 0  # cosine LR cycles (warm restarts, Loshchilov & Hutter 2017) over the pre-warmdown phase (0 = constant)
    lr_cycle_floor: Probability = 0.1  # the cycles' lowest LR, as a fraction of the peak
    lr_epoch_cosine: Count = 0  # the final N epochs each run a cosine from max(lr multiplier, floor) down to the floor (slowrun 1h record, "SWA cycles")
    lr_epoch_cosine_floor: Fraction = 0.05  # the floor of those cosines
    wd_schedule: str = "flat"  # flat | inverse (wd / max(lr multiplier, 0.1): lr*wd constant) | sawtooth (2 -> 0 per final epoch) | slowrun (see wd_hold_frac)
    wd_sawtooth_epochs: Count = 2  # how many final epochs the sawtooth weight decay spans
    wd_hold_frac: Probability = 0.4  # wd_schedule slowrun: multiplier 1 until this fraction of training, then linear down to
    wd_low: NonNegative = 0.65  # wd_low where the lr_epoch_cosine epochs start, then wd_low -> wd_high within each of them
    wd_high: NonNegative = 1.5  # (rising while the LR cosine falls: the 1h record's anti-phase weight decay)
    wd_floor: NonNegative = 0.7  # wd_schedule cycle_inverse: multiplier wd_floor + (1 - wd_floor)(1 - lr factor)/(1 - lr_cycle_floor)
    wd_points: str = ""  # wd_schedule points: "epoch:multiplier,..." knots at round(epoch / num_epochs x steps), linear between (numpy.interp; 15min: "0:1,2:1,8:0.125,15:1.1625")
    muon_momentum_warmup: Count = 0  # steps over which Muon momentum ramps linearly 0.85 -> muon_momentum (modded-nanogpt)
    batch_schedule: str = ""  # batch-size schedule: per-epoch multipliers of batch_tokens, the last repeating, e.g. "0.25,0.5,1": small batches early give more updates from the same tokens (modded-nanogpt's batch schedule); LRs unchanged
    window_warmup_frac: Probability = 0.0  # window schedule: every window grows from 1/stages of its size to full over this fraction of training (modded-nanogpt)
    window_warmup_stages: PositiveInt = 4  # distinct window sizes on the way: (k + 1) / stages of full, k = 0.. (each one torch.compile graph)
    window_schedule: str = ""  # "a-b:short,long;..." windows in keys (our count = the public FA3 window + 1; seq_len = full) for epochs a..b (1-based, contiguous from 1; the last stage holds after its end); each stage from its first epoch's first step; window_short is then unused ("" = off; 2h record: "1-6:257,769;7-13:769,1793;14-22:1281,2048")
    loop_start_frac: Fraction = 0.0  # the replay switches on from this fraction of training on
    loop_start_epoch: Count = 0  # looped layers switch on at the start of this (1-based) epoch (0 = use loop_start_frac; 1h record: 7)
    recurrence_start_frac: Fraction = 0.0  # one pass before this fraction of training, recurrence passes from it on (15min: 0.7)
    mtp_anneal_frac: Probability = 0.66  # offset k >= 1 fades linearly to 0 over its own slice of the first fraction of training, the furthest first
    # --- averaging and snapshots (each off by default) ------------------------------------------------------------
    ema_decay: Fraction = 0.0  # EMA of the weights, ema <- d * ema + (1 - d) * w (0 = off; Polyak averaging, modded-nanogpt)
    ema_every: PositiveInt = 1  # update the EMA every k optimizer steps (the decay applies per update)
    ema_start_frac: Probability = 0.0  # start the EMA (from the current weights) at this fraction of training
    ema_blend: Probability = 1.0  # at the end the weights become blend * EMA + (1 - blend) * last
    ema_candidate: bool = False  # the EMA kept as the 15min record keeps it: from zero, updated after steps 0, k, 2k, ... (k = ema_every),
    # bias-corrected, scored as its own candidate; the final weights stay the last step's (nothing blended)
    swa_epochs: Count = 0  # SWA over the final N epochs: each runs a cosine LR cycle (1 -> lr_cycle_floor) and its end
    # weights join a uniform average that replaces the weights at the end (Izmailov et al. 2018; slowrun records). 0 = off
    epoch_snapshots: Count = 0  # the weights at the ends of the final N epochs (the last included) become ensemble
    # candidates: probability averaging of the last epochs' checkpoints (slowrun unlimited records). 0 = off
    epoch_snapshot_weights: str = "equal"  # the epoch snapshots' mixture: equal (1/n) | recency (i / sum i, oldest
    # first) | both (equal is val_loss, recency is scored and reported beside it; slowrun 1h record #12, --logit-avg-mode)
    ckpt_avg_epochs: Count = 0  # weight-space average of the last N epoch-end weights (every parameter), scored as its own candidate (15min record: 4); 0 = off
    ckpt_avg_weights: str = "recency"  # that average's weights, oldest first: recency (i / sum i) | equal (1 / N)
    snapshot_cycles: Count = 0  # C cosine LR cycles per member (1 -> lr_cycle_floor), a snapshot at each cycle's end
    # joins the ensemble candidates (snapshot ensembles, Huang et al. 2017; slowrun unlimited record 2.987). 0 = off
    snapshot_cycle_shape: str = "cosine"  # each snapshot cycle's LR: cosine (1 -> lr_cycle_floor) | linear: floor +
    # (1 - floor)(1 - i/n) at step i of the cycle's n (slowrun unlimited record, --lr-floor 0.08)
    snapshot_cycle_epochs: bool = False  # each snapshot cycle is num_epochs / snapshot_cycles whole epochs, ending at an
    # epoch end (the unlimited record's 2-epoch cycles: with a batch_schedule, steps per cycle differ); off = equal steps
    snapshot_noise: NonNegative = 0.0  # at each cycle boundary add Gaussian noise of this size times each tensor's RMS
    snapshot_noise_min: NonNegative = 0.0  # > 0: the noise after cycle c = 1..C-1 falls by a cosine from snapshot_noise (c = 1)
    # to this (c = C-1) (unlimited record: 0.25 -> 0.05); 0 = snapshot_noise after every cycle
    snapshot_noise_stat: str = "rms"  # the noise's scale per tensor: rms | std (unbiased torch.std; one-element tensors
    # get none: the unlimited record's perturb_weights)
    # --- ensemble, distillation chain, selection (the public unlimited records: 8 members 3.402 -> 3.264, chain
    # distillation -> 3.126, snapshots chosen by learned weights -> 2.987) -----------------------------------------
    ensemble_size: PositiveInt = 1  # K members trained one after another, member k (from 0) with seed + 1000 k (1 = one model)
    ensemble_mode: str = "prob"  # how members combine: "prob" averages probabilities (slowrun) | "logit" averages logits
    ensemble_weights: str = ""  # comma-separated evaluation weights, one per candidate (members x their snapshots, oldest first; "" = uniform); normalised
    distill_alpha: Probability = 0.0  # member k >= 1 minimises (1 - a) CE + a T^2 KL(teacher || student); 0 = independent
    distill_temperature: Positive = 1.0  # T of the distillation KL (Hinton et al. 2015)
    distill_teacher: str = "previous"  # "previous": member k - 1 (under parallel_members: the previous round's last) | "ensemble": prob-average of the members before
    distill_chunk: PositiveInt = 128  # sequence positions per chunk of teacher logits: no fp32 batch x vocab teacher tensor
    distill_from: str = ""  # a finished run's folder: its members (members/member_NN.pt, or its model.pt) teach every
    # member of this run as one prob-averaged teacher (distill_alpha, T): an ensemble distilled into one model
    # (Kim et al. 2025, arXiv 2509.14786, kept most of an ensemble's gain in one student); "" = the chain above
    distill_mtp_inside: bool = False  # distilling, the objective is (1 - a)(CE + mtp_weight MTP) + a T^2 KL: MTP inside
    # the (1 - a) as the unlimited record folds it, not added outside
    snapshot_distill: bool = False  # each cycle after the first distils from the previous snapshot (distill_alpha, T)
    snapshot_distill_after: Count = 0  # snapshot_distill from this (0-based) cycle on, the cycles before it with no teacher
    # at all (unlimited record: 8, its nodes independent). 0 = from cycle 1, cycle 0 taught by the previous member if any
    fitness_tokens: Count = 0  # whole documents carved from the front of train (>= N tokens, never trained on) on which
    # mixture weights over the members are learned; the top select_top by weight form the final ensemble (slowrun
    # unlimited record 2.987: snapshot members chosen by learned weights on held-out train data). 0 = off
    select_top: Count = 0  # members kept after learning the weights (0 = all, weighted by the learned weights)
    select_steps: PositiveInt = 300  # Adam steps of the mixture-weight fit (minimises -log sum_i w_i p_i on the fitness slice)
    select_lr: Positive = 0.05  # Adam LR of the mixture-weight fit (unlimited record: 0.5)
    select_clip: NonNegative = 0.0  # clip the mixture logits' gradient norm to this (0 = off; unlimited record: 1.0)
    select_init_noise: NonNegative = 0.0  # the mixture logits start at this x N(0, 1), generator seeded 0 (0 = zeros; unlimited 1e-4)
    select_top_sweep: str = ""  # comma-separated K: each top-K ensemble by learned weight scored on val; the largest K
    # below the candidate count is the result (unlimited record: 8,16,32,64,128,256; its result.json keeps the largest)
    # --- evaluation -----------------------------------------------------------------------------------------------
    val_batch_size: PositiveInt = 16  # sequences per rank per evaluation forward
    val_every: Interval = 0  # also validate every N steps (0 = at each epoch end and at the end; -1 = only at the end)
    val_public_windows: Count = 0  # also score K disjoint (seq_len + 1)-token val windows chosen by numpy
    # RandomState(val_window_seed).permutation, and report the leaderboard's figure: the minimum over the epoch-end
    # evaluations and the averages (slowrun scores 4,864 windows; unlimited all 4,880). 0 = off
    val_window_seed: Seed32 = 42  # the permutation's seed (slowrun prepare_data.py's val shuffle seed)
    sample_tokens: Count = 0  # after the final evaluation, continue a few val prompts by N tokens (greedy, and top-k
    # with temperature from a generator seeded by --seed), printed and logged (0 = off)
    # --- kernels: each fast path beside its plain-PyTorch reference; the log says which one ran -------------------
    compile: str = "auto"  # torch.compile the model: auto (on for CUDA, off on CPU) | on | off
    fused_loss: str = "auto"  # soft-capped CE (+ distillation KL) from the raw lm_head output in vocab tiles: auto (Triton on CUDA) | on (Triton) | chunked (the PyTorch reference, chunked rows) | off (eager)
    attention: str = "auto"  # auto (FlexAttention on CUDA with compile when windows or doc_mask are on, else SDPA) | flex | sdpa
    muon_gram: str = "torch"  # Muon's Gram products X X^T and G G^T: torch | triton (a kernel computing only the upper-triangle tiles: half the FLOPs; not yet timed on a GPU, so not the default)
    muon_compile: str = "auto"  # torch.compile the orthogonalisation: auto (on for CUDA) | on | off (the plain reference)
    cpu_loss_rows: Count = 64  # CPU, plain next-token loss: soft-cap + log-softmax in chunks of this many positions,
    # recomputed in backward (ChunkedSoftcapCE), so no (positions, vocab) float32 intermediate outlives its chunk
    # (tiny, one step: 1.0 GiB peak RSS instead of 3.0); gradients and losses bitwise the eager ones; 0 = eager
    grad_sync: str = "after"  # gradient all-reduce: after (once backward ends) | overlap (each gradient's async all-reduce launched by its post-accumulate hook on the last micro-step: the same collectives, bit for bit) | overlap_flat (flattened buckets of grad_bucket_mb: fewer, larger collectives; bit-identical on 2 ranks, not on 3+ where a ring's summation order depends on an element's position)
    grad_bucket_mb: Positive = 25.0  # bucket size of grad_sync overlap_flat (DDP's default)

# What every public track shares (records/TRACKS.md section 4): the FineWeb files, 2048-token windows, 524,288 tokens
# per step, "SSSL" windows (public S = 1024 admits 1025 keys: our window counts keys), Polar Express, NorMuon, cautious
# and shape-scaled Muon weight decay, the 50,257 real tokens in the softmax, the records' 4,864 val windows scored
# beside our full val, a log line per step. Each GPU preset is this plus its record's own settings.
TRACK_COMMON = dict(
    train_files="data/fineweb/fineweb_train.bin", val_files="data/fineweb/fineweb_val.bin",
    test_files="data/fineweb/fineweb_test.bin", seq_len=2048, batch_tokens=524288, log_every=1,
    window_pattern="SSSL", window_short=1025, train_vocab=50257, eval_vocab=50257,
    muon_polar_express=True, normuon=True, cautious_wd=True, muon_wd_scaled=True, val_public_windows=4864,
)


def stages(table: str) -> dict:
    """A preset's training stages as one table (modded-nanogpt writes its schedule as a table of stages): a row per
    stretch of epochs, "a-b" = from epoch position a to b (0-based, b excluded: "0-6" is the first six epochs), rows
    back to back from 0, and a column per schedule, "-" where a stage leaves it alone. Returns the flags that carry
    it (each still a command-line override):
      windows        short,long window keys in the stage                     -> window_schedule
      looped_layers  off | on (off stages first)                             -> loop_start_epoch
      weight_decay   "x->y": the multiplier from x to y, linear in steps       -> wd_schedule points, wd_points
      batch          the batch_tokens multiplier of each epoch in the stage   -> batch_schedule"""
    rows = [line.split() for line in table.strip().splitlines()]
    header, rows = rows[0], rows[1:]
    spans = [tuple(int(x) for x in row[0].split("-")) for row in rows]
    if header[0] != "epochs" or any(len(row) != len(header) for row in rows) or spans[0][0] != 0 or \
            any(a >= b for a, b in spans) or any(prev[1] != nxt[0] for prev, nxt in zip(spans, spans[1:])):
        raise ValueError(f"stages: a header 'epochs ...' and rows 'a-b value ...' back to back from 0: {table!r}")
    flags = {}
    for column, name in enumerate(header[1:], start=1):
        cells = [(span, row[column]) for span, row in zip(spans, rows) if row[column] != "-"]
        if name == "windows":
            flags["window_schedule"] = ";".join(f"{a + 1}-{b}:{cell}" for (a, b), cell in cells)
        elif name == "looped_layers":
            on = [a for (a, _), cell in cells if cell == "on"]
            values = [cell for _, cell in cells]
            if not on or set(values) - {"off", "on"} or values != sorted(values, key=lambda cell: cell == "on"):
                raise ValueError(f"stages: looped_layers go off, then on: {table!r}")
            flags["loop_start_epoch"] = on[0] + 1
        elif name == "weight_decay":
            knots = [(str(a), cell.split("->")[0]) for (a, _), cell in cells] + \
                [(str(cells[-1][0][1]), cells[-1][1].split("->")[1])]
            if any(prev.split("->")[1] != nxt.split("->")[0] for (_, prev), (_, nxt) in zip(cells, cells[1:])):
                raise ValueError(f"stages: each weight_decay stage starts where the one before ends: {table!r}")
            flags.update(wd_schedule="points", wd_points=",".join(f"{a}:{x}" for a, x in knots))
        elif name == "batch":
            flags["batch_schedule"] = ",".join(cell for (a, b), cell in cells for _ in range(a, b))
        else:
            raise ValueError(f"stages: no schedule named {name!r} (windows, looped_layers, weight_decay, batch)")
    return flags


PRESETS: dict[str, dict] = {
    # The CPU mini-slowrun: the bundled FineWeb-Edu sample read for several epochs by a small model. Sized by
    # tokens/s, not parameters: at this width the 50,304-wide lm_head and its softmax cost most of each step.
    "tiny": dict(
        train_files="data/sample/fineweb_edu_train.bin",
        val_files="data/sample/fineweb_edu_val.bin",
        n_layer=4, n_embd=128, n_head=4, seq_len=256,
        batch_tokens=8192, device_batch_size=4, val_batch_size=8,
        num_epochs=3, muon_lr=0.02, embed_lr=0.2, head_lr=0.004,
        log_every=5, device="cpu",
    ),
    # The CPU data-efficiency track: FineWeb-Edu as UTF-8 bytes (vocabulary 256 + a document separator),
    # so the output layer is tiny and a one-thread CPU step goes into the transformer. The track's data is the first
    # 262,144 bytes of data/mini/mini_train.bin (whole documents); a plain run of this preset learns visibly in a few
    # minutes on 2 cores. See docs/mini.md and records/mini/.
    "mini": dict(
        train_files="data/mini/mini_train.bin", val_files="data/mini/mini_val.bin",
        test_files="data/mini/mini_test.bin", train_tokens=262144,
        tokenizer="bytes", vocab_size=257, bos_id=256,
        n_layer=3, n_embd=96, n_head=3, seq_len=128,
        batch_tokens=4096, device_batch_size=32, val_batch_size=64,
        num_epochs=2, muon_lr=0.02, embed_lr=0.2, head_lr=0.004,
        log_every=10, device="cpu",
    ),
}


# The same track's text in a small BPE ("bytes or a small BPE?", measured in bench/RESULTS.md): 1,024 ids
# learned from the 1/8 budget's 4 documents only (which every budget from 1/8 up contains), ~3 bytes per token, so a
# step sees 3x the text and a plain run at 1/8 reaches lower bits per byte in a fifth of the bytes' CPU time.
# train_tokens: the BPE tokens of the byte track's 44 documents (261,003 bytes); batch_tokens 1,536 ~ the byte
# preset's bytes per step.
PRESETS["mini_bpe"] = dict(
    PRESETS["mini"],
    train_files="data/mini/mini_bpe_train.bin", val_files="data/mini/mini_bpe_val.bin",
    test_files="data/mini/mini_bpe_test.bin", train_tokens=109639,
    tokenizer="bpe", bpe_file="data/mini/mini_bpe.tiktoken", vocab_size=1024,
    batch_tokens=1536, device_batch_size=12, num_epochs=4,
)

# Each track's preset is its public record, setting by setting (records/TRACKS.md has the table: setting | public
# script:line | our flag | same?). "1h": the 1-hour track's record, 3.195 (qlabs-eng/slowrun train.py at fd342f0,
# 30 x 1792, 14 heads, SwiGLU 4864). 8 GPUs x device batch 4 x 2048 tokens x 8 accumulation steps = 524,288.
# Kept different by design: FlexAttention/SDPA instead of FA3 (same mathematics),
# fp32 master weights of wte/lm_head, our RNG streams (document order, dropout masks).
PRESETS["1h"] = dict(
    TRACK_COMMON,
    n_layer=30, n_embd=1792, n_head=14, mlp="swiglu", mlp_hidden=4864, device_batch_size=4, val_batch_size=8,
    dropout=0.1, logit_softcap=10.0, num_epochs=11,
    # the public's steps: epochs of 48,800 windows (a multiple of its 4 x 8-GPU micro-batch), steps running on
    # across epoch ends: 190.625 a epoch, 2,097 in all, the schedules' N = 2,097
    public_steps=32,
    # the record's LRs after its 0.25 multiplier: matrix 0.04, embedding 0.15, unembedding 0.002, scalar 0.1
    muon_lr=0.01, embed_lr=0.0375, head_lr=0.0005, scalar_lr=0.025, muon_wd=1.3, adam_wd=1.3,
    # model: value projections from x0, U-Net skips, 12-channel attention output gates, x0 mixing, interleaved
    # head attention, normal c_proj init, layers 15-20 run three times from epoch 7 on
    value_proj=True, unet_skips=True, attn_gate=True, out_gate_channels=12, resid_mix=True, head_mix=True,
    proj_init="normal", loop_repeats=2, loop_range="15:21",
    # the training stages: the looped layers switch on after 6 of the 11 epochs
    **stages("""
        epochs   looped_layers
        0-6      off
        6-11     on
    """),
    # optimizer (beyond TRACK_COMMON): MuonEq-R, momentum 0.85 -> 0.95 over 300 steps; gates in Muon; resid
    # lambdas and skips at 1% of scalar_lr, x0 lambdas with beta1 0.96
    muon_eq_r=True, muon_momentum_warmup=300, gates_muon=True, resid_lr_scale=0.01, x0_beta1=0.96,
    muon_bf16=True,  # Muon rounded where the record's muon_step_fused rounds (bf16 update, lr, wd)
    rope_tables="bf16",  # its _precompute_rotary's bf16 cos/sin
    # schedules: square-root warmdown over the last 20 %, a cosine per epoch in the last 3, and the weight decay
    # held, decayed to 0.65, then 0.65 -> 1.5 within each of the last 3 epochs
    warmdown_frac=0.2, warmdown_shape=0.5, lr_epoch_cosine=3, lr_epoch_cosine_floor=0.05,
    wd_schedule="slowrun", wd_hold_frac=0.4, wd_low=0.65, wd_high=1.5,
    # the rest of the model and the evaluation: stochastic depth drawn once per block call (0.05 l/29), the MTP
    # block (weight 0.3), IHA at lr 0.02, the last 3 epochs' checkpoints probability-averaged (both weightings
    # reported)
    stochastic_depth=0.05, stochastic_depth_style="batch", mtp_weight=0.3, mtp_style="block", head_mix_lr=0.02,
    epoch_snapshots=3, epoch_snapshot_weights="both",
)
PRESETS["slowrun"] = PRESETS["1h"]  # the old name of the 1h preset, kept as an alias (the log says which it is)

# "2h": the 2-hour track's record, 3.139 (qlabs-eng/slowrun two_hour/train.py at fd342f0): the 1h record's model and
# recipe trained twice as long, and what two_hour/ changes: 22 epochs, looped layers from epoch 14, a cosine per epoch
# and the 0.65 -> 1.5 weight decay in the last 8, the last 11 epochs' checkpoints probability-averaged, and windows
# per epoch (public FA3 (S, L) 256/768, 768/1792, 1280/2048 = our 257/769, 769/1793, 1281/2048 keys) with YaRN on
# each growth of the long window. window_short (1h's 1025) is unused under the schedule.
PRESETS["2h"] = dict(
    PRESETS["1h"], num_epochs=22, lr_epoch_cosine=8, epoch_snapshots=11, yarn=True,
    # the training stages: (short, long) window keys growing twice, the looped layers on in the last stage
    **stages("""
        epochs   windows     looped_layers
        0-6      257,769     off
        6-13     769,1793    off
        13-22    1281,2048   on
    """),
    attn_qkv_bf16=True,  # its CausalSelfAttention casts q, k, v to bf16 for FA3 (a no-op under CUDA autocast)
    rope_tables="bf16_values",  # its Yarn tables: bf16-rounded values in float32 buffers, rotation in float32
)

# "baseline": the slowrun baseline record, 3.402 (qlabs-eng/slowrun train.py at 0d49316, the repository's first
# commit; records/TRACKS.md section 1.2 has the table): 30 x 1792, 14 heads, ReLU^2 MLP 7168, value-embedding tables,
# no U-Net, output gates, IHA, MTP or looping. 8 GPUs x device batch 4 x 2048 tokens x 8 accumulation steps = 524,288.
# Kept different by design: FlexAttention/SDPA instead of FA3 (same mathematics), fp32 master weights of wte, lm_head
# and the value tables (bf16 on CUDA in the public), our dropout masks.
PRESETS["baseline"] = dict(
    TRACK_COMMON,
    n_layer=30, n_embd=1792, n_head=14, mlp="relu2", mlp_hidden=7168, device_batch_size=4, val_batch_size=8,
    dropout=0.1, logit_softcap=15.0, num_epochs=12,
    public_steps=32,  # the public's steps: 48,800 windows an epoch, steps across epoch ends, 2,288 in all
    # the record's LRs after its 0.25 multiplier (matrix 0.08, embedding 0.3, unembedding 0.004, scalar 0.5); weight
    # decay 1.6 on the lm_head, wte, the value tables and every Muon matrix, flat
    muon_lr=0.02, embed_lr=0.075, head_lr=0.001, scalar_lr=0.125, muon_wd=1.6, adam_wd=1.6,
    # model: a value-embedding table on each of the 15 odd layers, added to V through its 32-channel gate; x0 mixing;
    # zero c_proj init (the default)
    value_embed_tables=True, resid_mix=True,
    # optimizer (beyond TRACK_COMMON): no MuonEq-R, momentum 0.85 -> 0.95 over 300 steps; the value gates in Muon;
    # resid lambdas at 1% of scalar_lr, x0 lambdas with beta1 0.96
    muon_momentum_warmup=300, value_gate_muon=True, resid_lr_scale=0.01, x0_beta1=0.96,
    muon_bf16=True,  # Muon rounded where the record's muon_step_fused rounds (bf16 update, lr, wd)
    rope_tables="bf16",  # its _precompute_rotary's bf16 cos/sin
    # schedule: no warmup, constant LR, then a linear warmdown over the last 50% to 0
    warmdown_frac=0.5,
    # data: the prepared windows in one fixed order (numpy seed 43), the same every epoch
    train_order="fixed",
)

# "15min": the 15-minute track's record, 3.307 (qlabs-eng/slowrun tiny/train.py at fd342f0; records/TRACKS.md section
# 1.3 has the table): 16 x 1024, 8 heads, SwiGLU 2816. The public step is 8 GPUs x 32 x 2048 tokens, no accumulation;
# ours is the same 524,288-token step as 16 x 2 accumulation steps, because the memory plan estimates ~82 GiB per
# 80 GB card at 32 (eager autograd's saved tensors; --device_batch_size 32 tries the record's split; the multi-offset
# loss then loses its 2 cross-row targets once per 65,536 rows instead of once per 32,768).
# Kept different by design: FlexAttention/SDPA instead of FA3 (same mathematics), fp32 master weights of wte and the
# lm_head (bf16 in the public), our RNG streams; fp8_head needs CUDA (on CPU drop it: the bf16 path computes the
# same loss) and has not yet run on a GPU.
PRESETS["15min"] = dict(
    TRACK_COMMON, train_vocab=0,
    n_layer=16, n_embd=1024, n_head=8, mlp="swiglu", mlp_hidden=2816, device_batch_size=16, val_batch_size=16,
    dropout=0.1, dropout_mlp=False, logit_softcap=15.0, num_epochs=15,
    public_steps=256,  # the public's steps: its 32 x 8-GPU micro-batch is a whole step, so 190 steps an epoch (2,850)
    # the record's LRs after its 0.8 multiplier (matrix 0.04, embedding 0.15, unembedding 0.001, scalar 0.25); weight
    # decay 0.8 held for 2 epochs, down to 0.1 at epoch 8, up to 0.93 at the end (multipliers of 0.8)
    muon_lr=0.032, embed_lr=0.12, head_lr=0.0008, scalar_lr=0.2, muon_wd=0.8, adam_wd=0.8,
    **stages("""
        epochs   weight_decay
        0-2      1->1
        2-8      1->0.125
        8-15     0.125->1.1625
    """),
    # model: value projections from x0 (gates in Muon), 12-channel output gates (AdamW betas 0.9/0.99), U-Net skips,
    # x0 mixing with lambdas from 1.1, learned XSA (eps 1e-4, betas 0.9/0.95), half-truncated RoPE (32 of 64 pairs),
    # the partial key offset on the long-window layers, no dropout on the MLP branch; the whole stack run twice from
    # 70% of training on (only the last pass has gradients)
    value_proj=True, value_gate_muon=True, attn_gate=True, out_gate_channels=12, out_gate_betas="0.9,0.99",
    unet_skips=True, resid_mix=True, resid_lambda_init=1.1, resid_lr_scale=0.01, x0_beta1=0.96,
    xsa="learned", xsa_eps=1e-4, xsa_betas="0.9,0.95", rope_pairs=32, key_offset=True,
    recurrence=2, recurrence_start_frac=0.7,
    # loss: next token plus tokens 2 and 3 ahead from the same head (weights 0.5, 0.25 annealed to 0 by 66% of
    # training), softmax over all 50,304 columns, the logits matmul in fp8 (CUDA)
    mtp_offsets="1,0.5,0.25", mtp_anneal_frac=0.66, fp8_head=True,
    # schedule: linear warmdown over the last 40%, a cosine per epoch in the last 4; momentum 0.85 -> 0.95 over 300
    # steps; no MuonEq-R
    warmdown_frac=0.4, lr_epoch_cosine=4, lr_epoch_cosine_floor=0.05, muon_momentum_warmup=300,
    muon_bf16=True,  # Muon rounded where the record's muon_step_fused rounds (bf16 update, lr, wd)
    rope_tables="bf16",  # its _precompute_rotary's bf16 cos/sin
    # averages scored as their own candidates: the EMA (every 10 steps, 0.15 per epoch) and the recency-weighted
    # weight average of the last 4 epoch ends
    ema_decay=0.15 ** (10 / 190), ema_every=10, ema_candidate=True, ckpt_avg_epochs=4, ckpt_avg_weights="recency",
)


# "unlimited": the unlimited track's record, 2.987 (qlabs-eng/slowrun unlimited/train.py + gradient_select.py at
# fd342f0, merged by #90; records/TRACKS.md 1.6 has the table). 5 members (the record's 5 nodes, one seed each), each
# 96 snapshot cycles of 2 epochs (192 epochs); every cycle's end is a candidate, 480 in all, and the top K by mixture
# weights learned on a 132,000-token slice carved from train form the ensemble. 30 x 2048, 16 heads, SwiGLU 5632, MTP
# block. 8 GPUs x device batch 2 x 2048 tokens x 16 accumulation steps (12 in the first and last quarter of cycles).
# Kept different by design: FlexAttention/SDPA instead of FA3 (same mathematics), fp32 master weights of wte/lm_head,
# frozen snapshots and the teacher as our host-memory copies (public: bf16 files, a bf16 teacher), our RNG streams
# (document order, dropout, weight noise, the selection's initial draw), members one after another on every rank
# (public: one per node at once).
PRESETS["unlimited"] = dict(
    TRACK_COMMON,
    n_layer=30, n_embd=2048, n_head=16, mlp="swiglu", mlp_hidden=5632, device_batch_size=2, val_batch_size=8,
    dropout=0.1, logit_softcap=15.0, num_epochs=192, val_every=-1,
    public_steps=16,  # the public's steps: epochs of whole 2 x 8-GPU micro-batches, round(2 epochs / batch) a cycle
    # the record's LRs after its 0.25 multiplier: matrix 0.04, embedding 0.15, unembedding 0.002, scalar 0.1; IHA 0.02
    muon_lr=0.01, embed_lr=0.0375, head_lr=0.0005, scalar_lr=0.025, head_mix_lr=0.02, muon_wd=1.3, adam_wd=1.3,
    # model: the 1h record's blocks (value projections from x0, U-Net skips, 12-channel output gates, x0 mixing, IHA,
    # normal c_proj init, MTP block 0.3) without stochastic depth; layers 15-24 run 5 times (4 replays) from the
    # first step on
    value_proj=True, unet_skips=True, attn_gate=True, out_gate_channels=12, resid_mix=True, head_mix=True,
    proj_init="normal", mtp_weight=0.3, mtp_style="block", loop_repeats=4, loop_range="15:25",
    # optimizer (beyond TRACK_COMMON): MuonEq-R, momentum fixed at 0.95 (no warmup), gates in Muon, resid lambdas and
    # skips at 1% of scalar_lr, x0 lambdas with beta1 0.96, clip norm 1
    muon_eq_r=True, gates_muon=True, resid_lr_scale=0.01, x0_beta1=0.96, grad_clip=1.0,
    muon_bf16=True,  # Muon rounded where the record's muon_step_fused rounds (bf16 update, lr, wd)
    rope_tables="bf16",  # its _precompute_rotary's bf16 cos/sin
    # snapshot cycles of 2 epochs: LR linear 1 -> 0.08 within each, weight decay 0.7 -> 1 against it; 393,216-token
    # batches in the first and last quarter of the cycles, 524,288 in the middle half
    ensemble_size=5, snapshot_cycles=96, snapshot_cycle_epochs=True, snapshot_cycle_shape="linear",
    lr_cycle_floor=0.08, wd_schedule="cycle_inverse", wd_floor=0.7,
    # (the record's amp = 1 - |2c/95 - 1| >= 0.5 over its 96 cycles c: cycles 24-71 = epochs 48-143 at full batch)
    **stages("""
        epochs   batch
        0-48     0.75
        48-144   1
        144-192  0.75
    """),
    # chain distillation from cycle 8 on (teacher: the previous cycle's end, before its noise), alpha 0.45, T 1.2, MTP
    # inside the (1 - alpha); after each cycle but the last, noise N(0, 1) x std x (0.25 -> 0.05 by a cosine)
    snapshot_distill=True, snapshot_distill_after=8, distill_alpha=0.45, distill_temperature=1.2,
    distill_mtp_inside=True, snapshot_noise=0.25, snapshot_noise_min=0.05, snapshot_noise_stat="std",
    # selection: 300 AdamW steps (lr 0.5, clip 1, logits 1e-4 N(0, 1) at start) on the fitness slice; top K for K in
    # 8..256 each scored, the largest is the result; the ensemble scored on all 4,880 disjoint val windows too
    fitness_tokens=132000, select_steps=300, select_lr=0.5, select_clip=1.0, select_init_noise=1e-4,
    select_top_sweep="8,16,32,64,128,256", val_public_windows=4880,
)

# The public records each preset reproduces: the figure, the script, and the model's size and training FLOPs per
# token by the public estimate_flops (records/TRACKS.md section 3; counted on the public model classes).
PUBLIC_RECORDS = {
    "1h": dict(figure=3.195, script="qlabs-eng/slowrun train.py@fd342f0", parameters=1_443_722_775,
               flops=8.66e9, flops_looped=11.81e9),
    # the baseline's own estimate_flops counts min(w, T) keys per query: 8.31 G; ours (the later records' formula)
    # counts the causal mean of the keys: 8.02 G for the same model (records/TRACKS.md section 3)
    "baseline": dict(figure=3.402, script="qlabs-eng/slowrun train.py@0d49316", parameters=2_688_522_876,
                     flops=8.31e9, flops_note="the baseline's counts min(w, T) keys per query; causal mean: 8.02 G"),
    "15min": dict(figure=3.307, script="qlabs-eng/slowrun tiny/train.py@fd342f0", parameters=316_935_848,
                  flops=1.76e9, flops_looped=3.20e9),
    # 2h: its estimate_flops as printed at the start (epoch 1's windows 256/768); looped: epochs 14-22's windows
    "2h": dict(figure=3.139, script="qlabs-eng/slowrun two_hour/train.py@fd342f0", parameters=1_443_722_775,
               flops=8.34e9, flops_looped=11.88e9),
}
PUBLIC_RECORDS["unlimited"] = dict(figure=2.987, script="qlabs-eng/slowrun unlimited/train.py@fd342f0",
                                   parameters=1_870_172_811, flops=11.22e9, flops_looped=24.89e9)
PRESET_ALIASES = {"slowrun": "1h"}


class ConfigError(ValueError):
    """A bad flag or an inconsistent set of hyperparameters: reported as one line, no traceback."""


def _parse_value(name: str, text: str | None, default):
    """Converts one flag's text to the type of the field's default."""
    kind = type(default)
    if kind is bool:
        if text is None:  # a bare `--flag` means true
            return True
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"flag --{name} expects true or false, got {text!r}")
    if text is None:
        raise ConfigError(f"flag --{name} needs a value ({kind.__name__})")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"flag --{name} expects {kind.__name__}, got {text!r}") from None


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--name value` or `--name=value` for any field; `--preset NAME` applies first wherever it stands."""
    pairs: list[tuple[str, str | None]] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: flags look like --name value")
        name, has_equals, text = token[2:].partition("=")
        value: str | None = text if has_equals else None
        if not has_equals and index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            value = argv[index + 1]
            index += 1
        if earlier := [text for given, text in pairs if given == name]:  # the last would win silently
            shown = ["no value" if text is None else text for text in (earlier[0], value)]
            raise ConfigError(f"flag --{name} given twice ({shown[0]}, then {shown[1]}): give it once")
        pairs.append((name, value))
        index += 1

    defaults = {f.name: f.default for f in dataclasses.fields(Hyperparameters)}
    settings: dict = {}
    for name, value in pairs:
        if name == "preset":
            if value is None:
                raise ConfigError(f"flag --preset needs a value (one of {', '.join(PRESETS)})")
            if value not in PRESETS:
                raise ConfigError(f"flag --preset: unknown preset {value!r} (known: {', '.join(PRESETS)})")
            settings = {**PRESETS[value], "preset": value}
    for name, value in pairs:
        if name == "preset":
            continue
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f"; did you mean --{close[0]}?" if close else " (python train_gpt.py --help lists them)"
            raise ConfigError(f"unknown flag --{name}{hint}")
        settings[name] = _parse_value(name, value, defaults[name])
    hp = Hyperparameters(**settings)
    check_numbers(hp)
    return hp


def require(condition: bool, message: str) -> None:
    """A setting check: the one-line ConfigError when the condition fails."""
    if not condition:
        raise ConfigError(message)


def check_numbers(hp: Hyperparameters) -> None:
    """Every numeric field against its value kind (NUMBER_KINDS: the range its annotation names; a plain float must
    be finite), before any work: the first one outside is the one-line ConfigError."""
    for field in dataclasses.fields(hp):
        if field.type not in NUMBER_KINDS:
            continue  # str and bool fields
        value, (should, passes) = getattr(hp, field.name), NUMBER_KINDS[field.type]
        whole = field.type == "int" or field.type != "float" and globals()[field.type] is int  # Count, Seed, ...
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise ConfigError(f"{field.name} must be {'a whole number' if whole else 'a number'}, got {value!r}")
        if not passes(value):
            raise ConfigError(f"{field.name} must {should}, got {value}")


def check_hyperparameters(hp: Hyperparameters, world_size: int) -> None:
    """Catches inconsistent settings before any work, each with a one-line reason: the recipe's, by the Recipe's
    groups, and the run settings' (check_run_settings, with the harness)."""
    check_numbers(hp)  # parse_args did, but a resumed run's hyperparameters.json or a caller's own need it too
    check_run_settings(hp, world_size)
    check_data_and_model(hp)
    check_optimizer(hp)
    check_batch_and_schedules(hp, world_size // hp.parallel_members)  # the ranks that train one member together
    check_averaging(hp)
    check_ensemble(hp)
    check_kernels(hp)


def check_data_and_model(hp: Hyperparameters) -> None:
    """Data, model and model tricks (the loss's too)."""
    require(hp.tokenizer in SHARD_TOKENIZERS, f"tokenizer must be one of {', '.join(SHARD_TOKENIZERS)}, got {hp.tokenizer!r}")
    require(hp.tokenizer != "bpe" or os.path.isfile(hp.bpe_file),
            f"tokenizer bpe needs --bpe_file, the ranks file data/encode.py --train_bpe wrote (got {hp.bpe_file!r})")
    require(0 <= hp.bos_id < hp.vocab_size, f"bos_id {hp.bos_id} must lie in [0, vocab_size={hp.vocab_size})")
    require(hp.train_order in ("docs", "fixed"), f"train_order must be docs or fixed, got {hp.train_order!r}")
    require(hp.n_embd % hp.n_head == 0, f"n_embd {hp.n_embd} is not divisible by n_head {hp.n_head}")
    require((hp.n_embd // hp.n_head) % 2 == 0, f"head_dim n_embd/n_head = {hp.n_embd // hp.n_head} must be even (RoPE)")
    require(hp.mlp in ("relu2", "swiglu"), f"mlp must be relu2 or swiglu, got {hp.mlp!r}")
    require(hp.proj_init in ("zero", "normal"), f"proj_init must be zero or normal, got {hp.proj_init!r}")
    for name in ("train_vocab", "eval_vocab"):
        columns = getattr(hp, name)
        require(columns == 0 or hp.bos_id < columns <= hp.vocab_size,
                f"{name} {columns} must be 0 (all) or lie in (bos_id={hp.bos_id}, vocab_size={hp.vocab_size}]")
    require(not (hp.value_embed_tables and hp.value_proj), "value_embed_tables and value_proj are two sources of the "
            "same value residual: set one")
    require(hp.xsa in ("", "fixed", "learned"), f"xsa must be '', fixed or learned, got {hp.xsa!r}")
    half = hp.n_embd // hp.n_head // 2
    require(0 <= hp.rope_pairs <= half, f"rope_pairs must lie in [0, head_dim/2 = {half}], got {hp.rope_pairs}")
    require(not hp.key_offset or hp.window_pattern, "key_offset acts on the long-window (L) layers and the last one: "
            "set window_pattern too (e.g. SSSL)")
    require(hp.resid_lambda_init == 1.0 or hp.resid_mix, "resid_lambda_init starts resid_mix's lambdas: set resid_mix")
    require(hp.stochastic_depth_style in ("sequence", "batch"),
            f"stochastic_depth_style must be sequence or batch, got {hp.stochastic_depth_style!r}")
    if hp.loop_repeats:
        start, stop = loop_layer_range(hp)
        require(0 <= start < stop <= hp.n_layer, f"loop_range {hp.loop_range!r} must be 'a:b' with 0 <= a < b <= n_layer")
    require(set(hp.window_pattern.upper()) <= {"S", "L"}, f"window_pattern uses S and L only, got {hp.window_pattern!r}")
    require(hp.mtp_style in ("linear", "block"), f"mtp_style must be linear or block, got {hp.mtp_style!r}")
    weights = mtp_offset_start_weights(hp)
    require(not weights or weights[0] > 0, f"mtp_offsets {hp.mtp_offsets!r}: the first weight (the next token) must be > 0")
    require(not weights or not (hp.mtp_weight or hp.distill_alpha or hp.snapshot_distill),
            "mtp_offsets is the 15min record's multi-token loss: drop mtp_weight and distillation")


def check_optimizer(hp: Hyperparameters) -> None:
    """The optimizer's groups and precision."""
    require(hp.muon_gram in ("torch", "triton"), f"muon_gram must be torch or triton, got {hp.muon_gram!r}")
    require(not (hp.muon_bf16 and hp.muon_gram == "triton"),
            "muon_bf16 computes the records' products in their order: it has no muon_gram triton path")
    require(hp.rope_tables in ("", "bf16", "bf16_values"),
            f"rope_tables must be '', bf16 or bf16_values, got {hp.rope_tables!r}")
    require(not (hp.value_gate_muon and hp.gates_muon), "gates_muon already trains the value gates with Muon: drop "
            "value_gate_muon")
    require(not hp.value_gate_muon or hp.value_proj or hp.value_embed_tables,
            "value_gate_muon trains the value gates: set value_proj or value_embed_tables")
    if hp.xsa_betas:
        parse_betas("xsa_betas", hp.xsa_betas)
        require(hp.xsa == "learned", "xsa_betas is the AdamW group of the learned XSA strengths: set xsa learned")
    if hp.out_gate_betas:
        parse_betas("out_gate_betas", hp.out_gate_betas)
        require(hp.attn_gate and not hp.gates_muon, "out_gate_betas is the AdamW group of the attention output "
                "gates: set attn_gate, and not gates_muon (which trains them with Muon)")


def check_batch_and_schedules(hp: Hyperparameters, world_size: int) -> None:
    """The batch (world_size: the ranks that train one member) and every schedule: LR, weight decay, cycles,
    looped layers and recurrence, windows, the MTP annealing."""
    require(hp.batch_tokens % hp.seq_len == 0, f"batch_tokens {hp.batch_tokens} is not a multiple of seq_len {hp.seq_len}")
    batch_seqs = hp.batch_tokens // hp.seq_len
    per_micro_step = hp.device_batch_size * world_size
    require(batch_seqs % per_micro_step == 0,
            f"batch_tokens/seq_len = {batch_seqs} sequences cannot be split into micro-batches of device_batch_size "
            f"{hp.device_batch_size} x {world_size} ranks; choose batch_tokens as a multiple of "
            f"{per_micro_step * hp.seq_len}")
    for multiplier in batch_schedule(hp):
        scheduled = multiplier * batch_seqs
        require(abs(scheduled - round(scheduled)) < 1e-6 and round(scheduled) % per_micro_step == 0 and scheduled > 0,
                f"batch_schedule multiplier {multiplier:g} gives {scheduled:g} sequences per step, not a positive "
                f"multiple of device_batch_size {hp.device_batch_size} x {world_size} ranks = {per_micro_step}")
    require(not hp.public_steps or not hp.batch_schedule or hp.snapshot_cycle_epochs,
            "public_steps with a batch_schedule steps cycle by cycle: it needs snapshot_cycle_epochs")
    require(not (hp.snapshot_cycles and hp.lr_cycles), "snapshot_cycles sets the LR cycles itself: drop lr_cycles")
    require(not (hp.lr_epoch_cosine and (hp.swa_epochs or hp.snapshot_cycles or hp.lr_cycles)),
            "lr_epoch_cosine shapes the final epochs' LR itself: drop swa_epochs, snapshot_cycles, lr_cycles")
    require(hp.snapshot_cycle_shape in ("cosine", "linear"),
            f"snapshot_cycle_shape must be cosine or linear, got {hp.snapshot_cycle_shape!r}")
    require(hp.snapshot_cycle_shape == "cosine" or hp.snapshot_cycles,
            "snapshot_cycle_shape shapes the snapshot cycles' LR: set snapshot_cycles")
    require(not hp.snapshot_cycle_epochs or (hp.snapshot_cycles and hp.num_epochs % hp.snapshot_cycles == 0
                                             and not hp.max_steps),
            "snapshot_cycle_epochs makes each cycle whole epochs: needs snapshot_cycles dividing num_epochs, no max_steps")
    require(hp.wd_schedule in ("flat", "inverse", "sawtooth", "slowrun", "points", "cycle_inverse"),
            f"wd_schedule must be flat, inverse, sawtooth, slowrun, points or cycle_inverse, got {hp.wd_schedule!r}")
    knots = wd_point_knots(hp)
    require(hp.wd_schedule == "points" or not knots, "wd_points are the knots of wd_schedule points: set it")
    require(hp.wd_schedule != "points" or knots, "wd_schedule points needs wd_points, e.g. 0:1,2:1,8:0.125,15:1.1625")
    require(hp.wd_schedule != "cycle_inverse" or hp.lr_cycle_floor < 1,
            "wd_schedule cycle_inverse divides by 1 - lr_cycle_floor: it needs lr_cycle_floor < 1")
    require(not (hp.loop_start_epoch and hp.loop_start_frac), "loop_start_epoch and loop_start_frac both say when "
            "looping starts: set one")
    require(not hp.recurrence_start_frac or hp.recurrence > 1, "recurrence_start_frac switches recurrence on: set "
            "recurrence >= 2")
    require(hp.mtp_anneal_frac > 0, f"mtp_anneal_frac must lie in (0, 1], got {hp.mtp_anneal_frac}")
    require(not hp.window_warmup_frac or hp.window_pattern,
            "window_warmup_frac grows the sliding windows: set window_pattern too (e.g. SSSL)")
    check_window_schedule(hp)


def check_window_schedule(hp: Hyperparameters) -> None:
    """window_schedule and yarn (records/TRACKS.md F15), each with a one-line reason."""
    require(not hp.yarn or hp.window_schedule, "yarn rescales RoPE when the window schedule's long window grows: "
            "set window_schedule too")
    require(not (hp.yarn and getattr(hp, "rope_pairs", 0)), "yarn rescales every RoPE pair (yarn_rotary builds the "
            "full table): it does not combine with rope_pairs")
    if not hp.window_schedule:
        return
    require(bool(hp.window_pattern), "window_schedule sets the S and L windows per epoch: set window_pattern too "
            "(e.g. SSSL)")
    require(not hp.window_warmup_frac, "window_schedule and window_warmup_frac both schedule the windows: set one")
    stages = parse_window_schedule(hp.window_schedule, hp.seq_len)
    longs = [stage[3] for stage in stages]
    require(not hp.yarn or longs == sorted(longs), f"yarn stretches RoPE for a growing context: the window "
            f"schedule's long windows {longs} must not shrink")


def check_averaging(hp: Hyperparameters) -> None:
    """Weight averages and snapshots: SWA, the EMA, the checkpoint average, epoch snapshots and their weightings."""
    require(not (hp.swa_epochs and (hp.ema_decay > 0 or hp.snapshot_cycles or hp.lr_cycles)),
            "swa_epochs sets the final epochs' LR and averages weights itself: drop ema_decay, snapshot_cycles, lr_cycles")
    require(not hp.swa_epochs or (hp.swa_epochs <= hp.num_epochs and not hp.max_steps),
            f"swa_epochs {hp.swa_epochs} runs one LR cycle per final whole epoch: it needs swa_epochs <= num_epochs "
            f"({hp.num_epochs}) and no max_steps")
    require(not hp.ema_candidate or hp.ema_decay > 0, "ema_candidate scores the EMA: set ema_decay")
    require(not hp.ema_candidate or hp.ema_start_frac == 0, "ema_candidate's EMA starts at step 0: drop ema_start_frac")
    require(hp.ckpt_avg_weights in ("recency", "equal"),
            f"ckpt_avg_weights must be recency or equal, got {hp.ckpt_avg_weights!r}")
    require(hp.epoch_snapshot_weights in ("equal", "recency", "both"),
            f"epoch_snapshot_weights must be equal, recency or both, got {hp.epoch_snapshot_weights!r}")
    require(hp.epoch_snapshot_weights == "equal" or hp.epoch_snapshots,
            "epoch_snapshot_weights weighs the epoch snapshots: set epoch_snapshots")
    require(not (hp.epoch_snapshots and hp.ensemble_weights), "epoch_snapshots: the candidate count depends on the "
            "run length; drop ensemble_weights (or learn weights with fitness_tokens)")
    require(not (hp.snapshot_noise or hp.snapshot_distill) or hp.snapshot_cycles or hp.epoch_snapshots,
            "snapshot_noise and snapshot_distill act where a snapshot is taken: set snapshot_cycles or epoch_snapshots")
    require(not hp.snapshot_noise or member_seed(hp, hp.ensemble_size - 1) * 1000 + hp.snapshot_cycles +
            hp.epoch_snapshots < 2**64, f"snapshot_noise seeds each snapshot's noise with seed x 1000 + cycle, which "
            f"must fit 64 bits: --seed {hp.seed} is too large for it (keep seeds below 1.8e16)")
    require(not hp.snapshot_noise_min or hp.snapshot_noise > 0,
            "snapshot_noise_min is where the noise's cosine ends: set snapshot_noise (its start) > 0")
    require(hp.snapshot_noise_stat in ("rms", "std"), f"snapshot_noise_stat must be rms or std, got {hp.snapshot_noise_stat!r}")


def check_ensemble(hp: Hyperparameters) -> None:
    """The ensemble, its distillation and its selection."""
    require(hp.ensemble_mode in ("prob", "logit"), f"ensemble_mode must be prob or logit, got {hp.ensemble_mode!r}")
    if hp.ensemble_weights:
        parse_weights(hp.ensemble_weights, candidate_count(hp))
    require(hp.distill_teacher in ("previous", "ensemble"),
            f"distill_teacher must be previous or ensemble, got {hp.distill_teacher!r}")
    require(hp.train_vocab == hp.eval_vocab or not (hp.distill_alpha or hp.snapshot_distill),
            "distillation compares a teacher's (evaluation) and a student's (training) softmax: train_vocab and "
            "eval_vocab must be equal")
    require(not hp.snapshot_distill or hp.distill_alpha > 0, "snapshot_distill needs distill_alpha > 0")
    require(not hp.distill_from or hp.distill_alpha > 0, "distill_from teaches through distill_alpha: set it > 0")
    require(not (hp.distill_from and hp.snapshot_distill), "distill_from and snapshot_distill are two teachers: keep one")
    require(not hp.snapshot_distill_after or hp.snapshot_distill,
            "snapshot_distill_after says from which cycle snapshot_distill acts: set snapshot_distill")
    require(not hp.distill_mtp_inside or (hp.mtp_weight > 0 and 0 < hp.distill_alpha < 1),
            "distill_mtp_inside puts the MTP term inside (1 - distill_alpha): needs mtp_weight > 0, 0 < distill_alpha < 1")
    require(not (hp.fitness_tokens and hp.ensemble_weights), "fitness_tokens learns the weights: drop ensemble_weights")
    require(not hp.select_top or hp.fitness_tokens, "select_top keeps the members with the largest learned weights: "
            "set fitness_tokens (the train tokens the weights are learned on)")
    require(not (hp.fitness_tokens and hp.ensemble_mode == "logit"),
            "fitness_tokens learns weights of a probability mixture: use ensemble_mode prob")
    require(not hp.select_top_sweep or (hp.fitness_tokens and not hp.select_top),
            "select_top_sweep scores top-K ensembles by learned weight: set fitness_tokens, drop select_top")
    top_sweep(hp, 0)  # a malformed list is refused here, before any work


def check_kernels(hp: Hyperparameters) -> None:
    """The kernels and compilation: each a path to the same numbers (fp8_head: the 15min record's fp8 matmul)."""
    require(hp.compile in ("auto", "on", "off"), f"compile must be auto, on or off, got {hp.compile!r}")
    require(hp.muon_compile in ("auto", "on", "off"), f"muon_compile must be auto, on or off, got {hp.muon_compile!r}")
    require(hp.fused_loss in ("auto", "on", "chunked", "off"),
            f"fused_loss must be auto, on, chunked or off, got {hp.fused_loss!r}")
    require(hp.attention in ("auto", "flex", "sdpa"), f"attention must be auto, flex or sdpa, got {hp.attention!r}")
    require(hp.grad_sync in ("after", "overlap", "overlap_flat"),
            f"grad_sync must be after, overlap or overlap_flat, got {hp.grad_sync!r}")
    require(not hp.fp8_head or mtp_offset_start_weights(hp), "fp8_head is the matmul of the mtp_offsets loss: set "
            "mtp_offsets")
    require(not hp.fp8_head or hp.train_vocab == 0, "fp8_head scores all vocab_size columns, as the 15min record "
            "does: set train_vocab 0")
    require(not hp.fp8_head or hp.plan_only or (hp.device != "cpu" and torch.cuda.is_available()),
            "fp8_head needs a CUDA device (fp8 matmuls): drop it on CPU (the bf16 path computes the same loss)")
    require(not hp.fp8_head or (hp.vocab_size % 16 == 0 and hp.n_embd % 16 == 0 and
                                (hp.device_batch_size * hp.seq_len) % 16 == 0),
            "fp8_head: torch._scaled_mm needs vocab_size, n_embd and device_batch_size x seq_len divisible by 16")


def number_list(name: str, text: str, rule: str, example: str, valid, cast=float, count: int = 0) -> list:
    """A list flag ("0.25,0.5,1") -> its numbers: every comma-separated list goes through here (batch_schedule,
    mtp_offsets, select_top_sweep, ensemble_weights, the *_betas). One line naming the flag, its rule and an
    example when a part is not a number, breaks the rule (valid), or count > 0 numbers were wanted and not given."""
    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = None
    if values is None or not all(valid(v) for v in values) or (count and len(values) != count):
        raise ConfigError(f"{name} must be {f'{count} ' if count else ''}comma-separated {rule} like {example}, got "
                          f"{text!r}")
    return values


def top_sweep(hp: Hyperparameters, candidates: int) -> list[int]:
    """select_top_sweep's K values below the candidate count, ascending (the unlimited record's k_values: a K that
    would keep every candidate is dropped); [] when the flag is off."""
    values = number_list("select_top_sweep", hp.select_top_sweep, "whole numbers > 0", "8,16,32", lambda k: k > 0, int)
    return sorted(k for k in set(values) if k < candidates)


def mtp_offset_start_weights(hp: Hyperparameters) -> list[float]:
    """--mtp_offsets "1,0.5,0.25" -> [1.0, 0.5, 0.25] (the weights of targets t, t+1, t+2); [] when off."""
    return number_list("mtp_offsets", hp.mtp_offsets, "finite weights >= 0", "1,0.5,0.25", lambda w: 0 <= w < math.inf)


def wd_point_knots(hp: Hyperparameters) -> list[tuple[float, float]]:
    """--wd_points "0:1,2:1,8:0.125,15:1.1625" -> [(epoch, multiplier), ...], epochs increasing; [] when empty."""
    try:
        knots = [tuple(float(x) for x in part.split(":")) for part in hp.wd_points.split(",") if part.strip()]
    except ValueError:
        knots = [()]
    if any(len(knot) != 2 or not (math.isfinite(knot[0]) and 0 <= knot[1] < math.inf) for knot in knots) or \
            any(b[0] <= a[0] for a, b in zip(knots, knots[1:])):
        raise ConfigError(f"wd_points must be epoch:multiplier knots, epochs increasing, multipliers >= 0, like "
                          f"0:1,2:1,8:0.125,15:1.1625; got {hp.wd_points!r}")
    return knots


def parse_betas(name: str, text: str) -> tuple[float, float]:
    """ "0.9,0.99" -> (0.9, 0.99), each in [0, 1), or the one-line ConfigError naming the flag."""
    return tuple(number_list(name, text, "AdamW betas in [0, 1)", "0.9,0.99", lambda b: 0 <= b < 1, count=2))


def batch_schedule(hp: Hyperparameters) -> tuple[float, ...]:
    """The per-epoch batch multipliers of --batch_schedule ("0.25,0.5,1"), () when off."""
    return tuple(number_list("batch_schedule", hp.batch_schedule, "finite numbers > 0", "0.25,0.5,1",
                             lambda m: 0 < m < math.inf))


def candidate_count(hp: Hyperparameters) -> int:
    """Ensemble candidates per run, as far as the flags alone tell: the members times their snapshots (with both
    snapshot_cycles and epoch_snapshots the union of their steps can hold more; ensemble_weights is refused then)."""
    return hp.ensemble_size * max(1, hp.snapshot_cycles, hp.epoch_snapshots)


def parse_weights(text: str, count: int) -> list[float]:
    """`--ensemble_weights 1,2,1` -> [0.25, 0.5, 0.25]; one finite positive weight per candidate (to leave one out,
    leave out its file: the running ensembles and the log-probabilities need every weight > 0)."""
    weights = number_list("ensemble_weights", text, "finite weights > 0 (one per candidate)", "1,2,1",
                          lambda w: 0 < w < math.inf, count=count)
    require(sum(weights) < math.inf, f"ensemble_weights {text!r}: the weights' sum overflows")
    return [w / sum(weights) for w in weights]


# ----------------------------------------------------------------------------------------------------------------------
# Distributed setup


WAITS = itertools.count()  # Dist.wait_for_all's store keys: every rank makes the same calls in the same order


@dataclass
class Dist:
    """Where this process stands: its rank among world_size processes and its device. Works without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None  # the process group of these ranks (None: the whole world); see split_world
    first_global_rank: int = 0  # the global rank of this group's rank 0 (broadcasts name their source globally)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def host(self) -> torch.device:
        """Where frozen models (finished members, snapshots, teachers) wait between uses: host memory. On CPU the host
        IS the training device; frozen_on_device still says which frozen models are in use there."""
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def wait_for_all(self) -> None:
        """A barrier of the whole world with no time limit, for waits of unknown length: at a round's end, groups
        training members at once may finish hours apart (a collective would time out at twice dist_timeout). Each
        rank counts itself in the process group's store and polls; a rank that dies meanwhile is named by the
        heartbeat watchdog, which keeps beating while this one waits."""
        if self.world_size == 1:
            return
        assert self.group is None, "wait_for_all is the whole world's"
        store, key = dist.distributed_c10d._get_default_store(), f"slowrun_wait/{next(WAITS)}"
        store.add(key, 1)
        pause = 0.01
        while store.add(key, 0) < self.world_size:  # reads the count without blocking
            time.sleep(pause)
            pause = min(1.0, pause * 2)

    def from_first_rank(self, value):
        """rank 0's value of a small Python object, on every rank (run ids, decisions every rank must share)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self.first_global_rank, group=self.group)
        return box[0]


def split_world(dist_info: Dist, groups: int) -> tuple[Dist, int]:
    """Splits the world into `groups` process groups of consecutive ranks (torch.distributed.new_group) that train
    different ensemble members at once, data-parallel inside; returns (this rank's group as a Dist, group index)."""
    if groups == 1:
        return dist_info, 0
    size = dist_info.world_size // groups
    handles = [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(groups)]  # every rank makes all
    index = dist_info.rank // size
    return Dist(rank=dist_info.rank % size, world_size=size, local_rank=dist_info.local_rank, device=dist_info.device,
                group=handles[index], first_global_rank=index * size), index


def setup_distributed(device_choice: str = "auto", timeout_s: float | None = None) -> Dist:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs, gloo on CPU. timeout_s (the
    dist_timeout flag) bounds every collective and starts the heartbeat watchdog (see start_heartbeat_watchdog)."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but torch sees no CUDA device")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # twice the watchdog's limit: a silent rank is named by the watchdog first, not by a gloo/NCCL traceback
        timeout = {} if timeout_s is None else dict(timeout=datetime.timedelta(seconds=2 * timeout_s))
        if use_cuda:
            dist.init_process_group(backend="nccl", device_id=device, **timeout)
        else:
            dist.init_process_group(backend="gloo", **timeout)
        if timeout_s is not None:
            start_heartbeat_watchdog(rank, world_size, timeout_s)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# Data: modded-nanogpt .bin shards, read for many epochs with per-epoch document shuffling


class DataError(ValueError):
    """A missing or malformed data file: one line naming the file and what is wrong."""


def load_tokens(pattern: str, vocab_size: int, what: str) -> np.ndarray:
    """Concatenates every shard that the glob matches, in name order."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise DataError(f"{pattern}: no {what} file matches: fetch FineWeb with python data/fineweb.py, or train on "
                        f"the bundled sample with --preset tiny")
    return np.concatenate([read_shard(path, vocab_size) for path in paths])


def document_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Start offsets of the documents: each <|endoftext|> opens one; leading tokens before the first form one too."""
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return starts.astype(np.int64)


def truncate_to_document(tokens: np.ndarray, budget: int, bos_id: int, name: str) -> np.ndarray:
    """The first `budget` tokens, cut back to the last document start within them so no document is split."""
    if budget >= tokens.size:
        return tokens
    starts = document_starts(tokens[:budget + 1], bos_id)
    cut = int(starts[-1]) if starts[-1] > 0 else budget  # a first document longer than the budget is cut inside
    return tokens[:cut]


def shuffled_stream(tokens: np.ndarray, doc_starts: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The train tokens with whole documents in a new order for each (seed, epoch): the same on every rank."""
    order = np.random.default_rng([seed, epoch]).permutation(doc_starts.size)
    doc_ends = np.append(doc_starts[1:], tokens.size)
    return np.concatenate([tokens[doc_starts[i]:doc_ends[i]] for i in order])


class TrainData:
    """The fixed train budget, cut into disjoint windows of seq_len + 1 tokens once per epoch.

    Each epoch reshuffles whole documents (seed, epoch) and packs the stream into windows. Steps are numbered over the
    whole run; locate() turns one into (epoch, step in epoch). Every piece is a pure function of (tokens, seed,
    epoch, step, micro_step, rank), and a step's windows are split over micro-steps and ranks the same way on any
    world size, so 1, 2 or 8 ranks compute the same update. Two ways to step through the epochs:

    - whole-step epochs (public_steps 0, the CPU tracks): step s of an epoch takes its windows [s*B, (s+1)*B), B =
      batch_tokens / seq_len (times the epoch's batch_schedule multiplier); every train token lies in exactly one
      window per epoch, the stream's last window and the epoch's last step are usually short (missing targets are
      -1, ignored, and the loss is normalised by the true target count of the global step).
    - the public records' stepping (public_steps W > 0): each epoch keeps floor(windows / W) x W whole
      windows (the public DataLoader drops the rest: W is its micro-batch on 8 GPUs, device batch x 8) and the run
      reads the epochs as one stream of windows, so a step can end in the next epoch (1h: 190.625 steps per epoch).
      The run is ceil(epochs x E / B) steps (the public loop runs until the epoch counter passes num_epochs) and
      the schedules see N = round(epochs x E / B) (the public's num_iterations), steps per epoch N / epochs. With a
      batch_schedule and snapshot cycles of whole epochs (cycle_epochs), each cycle is round(cycle_epochs x E / B_c)
      steps at its own batch (the unlimited record's cycle_lengths) and the run is their sum."""

    def __init__(self, tokens: np.ndarray, bos_id: int, seq_len: int, batch_seqs: int, device_batch_size: int,
                 world_size: int, rank: int, seed: int, batch_schedule: tuple[float, ...] = (), *,
                 public_steps: int = 0, epochs: int = 0, cycle_epochs: int = 0):
        self.tokens = tokens
        self.doc_starts = document_starts(tokens, bos_id)
        self.seq_len, self.window = seq_len, seq_len + 1
        self.full_batch_seqs, self.device_batch_size = batch_seqs, device_batch_size
        self.schedule = tuple(batch_schedule) or (1.0,)  # per-epoch multipliers of the batch; the last one repeats
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.windows_per_epoch = math.ceil(tokens.size / self.window)
        self._streams: dict[int, np.ndarray] = {}
        self.public_steps, self.epochs = public_steps, epochs
        self.segments = None  # public stepping: [(first step, steps or None = open-ended, batch, first window)]
        if public_steps:
            self.windows_per_epoch = tokens.size // self.window // public_steps * public_steps
            self.plan_public_steps(cycle_epochs)

    def plan_public_steps(self, cycle_epochs: int) -> None:
        """The step plan of the public stepping: one open-ended segment at a constant batch, or one per cycle."""
        if self.windows_per_epoch < 1:
            raise DataError(f"public_steps {self.public_steps}: {self.tokens.size:,} train tokens hold fewer than "
                            f"{self.public_steps} whole windows of seq_len + 1 = {self.window}")
        if len(self.schedule) == 1:
            self.segments = [(0, None, self.batch_seqs(0), 0)]
            return
        if not cycle_epochs or not self.epochs:
            raise ConfigError("public_steps with a batch_schedule steps cycle by cycle: it needs snapshot cycles of "
                              "whole epochs (snapshot_cycle_epochs)")
        self.segments, step, window = [], 0, 0
        for first_epoch in range(0, self.epochs, cycle_epochs):
            batch = self.batch_seqs(first_epoch)
            steps = max(1, round(cycle_epochs * self.windows_per_epoch / batch))
            self.segments.append((step, steps, batch, window))
            step, window = step + steps, window + steps * batch

    def segment(self, step: int) -> tuple[int, int | None, int, int]:
        return self.segments[bisect.bisect_right([first for first, *_ in self.segments], step) - 1]

    def first_window(self, step: int) -> int:
        """Public stepping: the run-wide index of the step's first window (epoch = index // windows_per_epoch)."""
        first, _, batch, window = self.segment(step)
        return window + (step - first) * batch

    def step_batch_seqs(self, step: int) -> int:
        """Sequences in this run step (all ranks)."""
        return self.segment(step)[2] if self.segments else self.batch_seqs(self.locate(step)[0])

    def run_steps(self, epochs: int) -> int:
        """The steps of a run of `epochs` epochs."""
        if not self.segments:
            return self.epoch_start(epochs)
        if self.segments[0][1] is None:
            return math.ceil(epochs * self.windows_per_epoch / self.segments[0][2])
        first, steps, _, _ = self.segments[-1]
        return first + steps

    def schedule_steps(self, epochs: int) -> int:
        """The run length the schedules see: the public's round(epochs x E / B) under public stepping (it may be one
        less than the steps run), else the steps run."""
        if self.segments and self.segments[0][1] is None:
            return round(epochs * self.windows_per_epoch / self.segments[0][2])
        return self.run_steps(epochs)

    def batch_seqs(self, epoch: int) -> int:
        """Sequences per optimizer step (all ranks) in this epoch."""
        return round(self.full_batch_seqs * self.schedule[min(epoch, len(self.schedule) - 1)])

    def grad_accum_steps(self, epoch: int) -> int:
        return self.batch_seqs(epoch) // (self.device_batch_size * self.world_size)

    def steps_in(self, epoch: int) -> int:
        if self.segments:
            return self.epoch_start(epoch + 1) - self.epoch_start(epoch)
        return math.ceil(self.windows_per_epoch / self.batch_seqs(epoch))

    def epoch_start(self, epoch: int) -> int:
        """The run's step number of the first step of this epoch (epoch = num_epochs: the run's step count). Public
        stepping: the first step whose first window lies in the epoch, the step the public loop has seen the epoch
        counter move on to it (its epoch-end evaluation and epoch-keyed switches come before that step)."""
        if self.segments:
            target = epoch * self.windows_per_epoch
            for first, steps, batch, window in self.segments:
                if steps is None or target < window + steps * batch:
                    return first + max(0, -(-(target - window) // batch))
            first, steps, _, _ = self.segments[-1]
            return first + steps
        scheduled = min(epoch, len(self.schedule))
        return sum(self.steps_in(e) for e in range(scheduled)) + (epoch - scheduled) * self.steps_in(scheduled)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a run step."""
        if self.segments:
            epoch = self.first_window(step) // self.windows_per_epoch
            return epoch, step - self.epoch_start(epoch)
        epoch = 0
        while epoch < len(self.schedule) - 1 and step >= self.steps_in(epoch):
            step -= self.steps_in(epoch)
            epoch += 1
        full_epochs, step_in_epoch = divmod(step, self.steps_in(epoch))
        return epoch + full_epochs, step_in_epoch

    def epoch_position(self, step: int) -> float:
        """Epochs completed after `step` steps, fractional: 2.5 = halfway through the third epoch. Public stepping:
        the public's step / (N / epochs) at a constant batch, windows read / E with cycles."""
        if self.segments and self.segments[0][1] is None and self.epochs:
            return step * self.epochs / self.schedule_steps(self.epochs)
        if self.segments:
            return (self.first_window(step) if step < self.run_steps(self.epochs) else
                    self.epochs * self.windows_per_epoch) / self.windows_per_epoch
        epoch, step_in_epoch = self.locate(step)
        return epoch + step_in_epoch / self.steps_in(epoch)

    def stream(self, epoch: int) -> np.ndarray:
        if epoch not in self._streams:
            if len(self._streams) > 1:  # at most two epochs at once: a step across an epoch boundary reads both
                self._streams.pop(next(iter(self._streams)))
            self._streams[epoch] = shuffled_stream(self.tokens, self.doc_starts, self.seed, epoch)
        return self._streams[epoch]

    def window_ids(self, epoch: int, step_in_epoch: int, micro_step: int, rank: int) -> np.ndarray:
        """Which windows this (step, micro-step, rank) trains on: ids within the epoch (past its end: padding), or
        run-wide ids under public stepping."""
        offset = (micro_step * self.world_size + rank) * self.device_batch_size
        if self.segments:
            first = self.first_window(self.epoch_start(epoch) + step_in_epoch) + offset
        else:
            first = step_in_epoch * self.batch_seqs(epoch) + offset
        return np.arange(first, first + self.device_batch_size)

    def windows(self, epoch: int, window_ids: np.ndarray) -> np.ndarray:
        """(len(window_ids), seq_len + 1) int64 token windows, -1 where the stream has run out."""
        if not self.segments:
            return self.epoch_windows(epoch, window_ids)
        epochs, within = np.divmod(window_ids, self.windows_per_epoch)
        return np.concatenate([self.epoch_windows(int(e), within[epochs == e]) for e in np.unique(epochs)])

    def epoch_windows(self, epoch: int, window_ids: np.ndarray) -> np.ndarray:
        stream = self.stream(epoch)
        out = np.full((window_ids.size, self.window), -1, dtype=np.int64)
        for row, window_id in enumerate(window_ids):
            chunk = stream[window_id * self.window:(window_id + 1) * self.window]
            out[row, :chunk.size] = chunk
        return out

    def micro_batch(self, epoch: int, step_in_epoch: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, T) and targets (B, T) for this rank; ignored targets are -1 (their inputs are 0)."""
        windows = torch.from_numpy(self.windows(epoch, self.window_ids(epoch, step_in_epoch, micro_step, self.rank)))
        return windows[:, :-1].clamp(min=0), windows[:, 1:].clone()

    def step_target_count(self, epoch: int, step_in_epoch: int) -> int:
        """Targets in the whole global step (all ranks, all micro-steps): the loss normaliser. Needs no communication."""
        if self.segments:  # every window whole
            return self.step_batch_seqs(self.epoch_start(epoch) + step_in_epoch) * self.seq_len
        first = step_in_epoch * self.batch_seqs(epoch)
        ids = np.arange(first, min(first + self.batch_seqs(epoch), self.windows_per_epoch))
        lengths = np.clip(self.tokens.size - ids * self.window, 0, self.window)
        return int(np.clip(lengths - 1, 0, None).sum())


TRAIN_ORDER_SEED = 43  # slowrun prepare_data.py at 0d49316: np.random.seed(43); np.random.shuffle(train windows)


class FixedOrderTrainData(TrainData):
    """train_order fixed, the slowrun baseline record's data order (records/TRACKS.md F18a; its prepare_data.py and
    DataLoader at 0d49316): the train stream, unshuffled, cut into n = tokens // (seq_len + 1) disjoint windows (the
    partial last one dropped), permuted once by numpy RandomState(43) (the same permutation as the public's
    np.random.seed(43) + np.random.shuffle of the window rows) and read in that order in every epoch. Like the public
    DataLoader it also drops the last windows of that order down to a multiple of its micro-batch: public_steps W
    when set (the public's device batch x 8 GPUs, so 4 of 48,804 at W = 32, on any world size), else device_batch_size
    x ranks. Steps, micro-steps and ranks take the windows as TrainData does, which is the public's split too
    (micro-batch m, rank r: windows (m ranks + r) device_batch + i); under public stepping a step runs on into the
    next epoch as the public's does, else the epoch's last step is short."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        count = self.tokens.size // self.window
        unit = self.public_steps or self.device_batch_size * self.world_size
        usable = count - count % unit
        if usable < 1:
            raise DataError(f"train_order fixed: {self.tokens.size:,} train tokens hold {count} whole windows of "
                            f"seq_len + 1 = {self.window}, fewer than one micro-step of {unit} windows")
        self.order = np.random.RandomState(TRAIN_ORDER_SEED).permutation(count)[:usable]
        self.windows_per_epoch = usable

    def stream(self, epoch: int) -> np.ndarray:
        return self.tokens  # never reshuffled: the order lives in self.order

    def epoch_windows(self, epoch: int, window_ids: np.ndarray) -> np.ndarray:
        """(len(window_ids), seq_len + 1) int64: window id i is stream window order[i]; ids past the end are -1."""
        out = np.full((window_ids.size, self.window), -1, dtype=np.int64)
        for row, window_id in enumerate(window_ids):
            if window_id < self.windows_per_epoch:
                start = int(self.order[window_id]) * self.window
                out[row] = self.tokens[start:start + self.window]
        return out

    def step_target_count(self, epoch: int, step_in_epoch: int) -> int:
        """Every window is whole: seq_len targets for each of the step's windows that exist."""
        if self.segments:
            return super().step_target_count(epoch, step_in_epoch)
        first = step_in_epoch * self.batch_seqs(epoch)
        return max(0, min(self.batch_seqs(epoch), self.windows_per_epoch - first)) * self.seq_len


def live_micro_steps(train_data: TrainData, epoch: int, step_in_epoch: int, rank: int) -> int:
    """How many of the step's micro-steps hold at least one real window on this rank (at least 1, so that every rank
    has gradients to sum); the rest are all padding, skipped. An epoch's last step is usually short: on the tiny
    preset it has 2 of its 32 windows, and running all 8 micro-steps made it cost a full step for 301 targets, the
    ~30% lower tokens/s after each epoch end. A skipped micro-step's targets are all -1: its
    gradient (cross-entropy, MTP, distillation, all masked by target) is exactly zero, so nothing else changes.
    Public stepping has no padding: every micro-step of the step's own batch."""
    if train_data.segments:
        step = train_data.epoch_start(epoch) + step_in_epoch
        return train_data.step_batch_seqs(step) // (train_data.device_batch_size * train_data.world_size)
    per_micro_step = train_data.world_size * train_data.device_batch_size
    left = (train_data.windows_per_epoch - step_in_epoch * train_data.batch_seqs(epoch)
            - rank * train_data.device_batch_size)  # windows from this rank's first one of the step to the epoch's end
    return min(train_data.grad_accum_steps(epoch), max(1, -(-left // per_micro_step)))


class EvalData:
    """A validation or test set scored whole: consecutive seq_len windows (each target predicted once), split
    round-robin over ranks. The summed loss and token count are the same on any world size."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = (tokens.size - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"{name}: {tokens.size:,} tokens, fewer than one sequence of seq_len + 1 = {seq_len + 1}")
        self.num_targets = self.num_windows * seq_len

    def batches(self, rank: int, world_size: int, batch_size: int):
        """Yields (inputs, targets) int64 tensors of up to batch_size windows for this rank."""
        mine = np.arange(rank, self.num_windows, world_size)
        for first in range(0, mine.size, batch_size):
            starts = mine[first:first + batch_size] * self.seq_len
            rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
            rows = torch.from_numpy(rows)
            yield rows[:, :-1], rows[:, 1:]


class PublicWindows(EvalData):
    """The val windows the public slowrun records score (records/TRACKS.md F22): disjoint (seq_len + 1)-token windows
    [k (T+1), (k+1) (T+1)), k the first `count` entries of numpy RandomState(seed).permutation(n // (T+1)) (their
    DataLoader without document shuffling, prepare_data.py's val seed 42; 152 eval steps x 8 ranks x 4 = 4,864 of the
    4,880 windows). Targets are the last T tokens of each window; split round-robin over ranks like EvalData."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str, count: int, seed: int):
        self.tokens, self.seq_len = tokens, seq_len
        available = tokens.size // (seq_len + 1)
        if not 1 <= count <= available:
            raise DataError(f"{name}: val_public_windows {count:,} needs that many disjoint windows of seq_len + 1 = "
                            f"{seq_len + 1} tokens; {tokens.size:,} tokens hold {available:,}")
        self.window_ids = np.random.RandomState(seed).permutation(available)[:count]
        self.num_windows, self.num_targets = count, count * seq_len

    def batches(self, rank: int, world_size: int, batch_size: int):
        mine = self.window_ids[rank::world_size]
        for first in range(0, mine.size, batch_size):
            rows = [self.tokens[k * (self.seq_len + 1):(k + 1) * (self.seq_len + 1)] for k in mine[first:first + batch_size]]
            rows = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield rows[:, :-1], rows[:, 1:]


@dataclass
class RunData:
    """The token sets of a run, loaded and checked once for all members."""
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    val_data: EvalData
    test_data: EvalData | None
    fitness_data: EvalData | None = None  # carved from the front of train for member selection, never trained on
    public_data: EvalData | None = None  # val_public_windows: the public records' val windows (PublicWindows)
    token_bytes: np.ndarray | None = None  # bytes per token id, for bits per byte on public_data


def carve_fitness_slice(tokens: np.ndarray, fitness_tokens: int, bos_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(fitness, rest): the fewest whole leading documents holding at least fitness_tokens tokens, and the rest."""
    starts = document_starts(tokens, bos_id)
    later = starts[starts >= fitness_tokens]
    if later.size == 0 or later[0] == 0:
        raise DataError(f"{name}: fitness_tokens {fitness_tokens:,} leaves no whole document to train on "
                        f"({tokens.size:,} train tokens)")
    return tokens[:later[0]], tokens[later[0]:]


def load_run_data(hp: Hyperparameters, need_train: bool = True) -> RunData:
    check_shard_tokenizers(hp, [hp.train_files if need_train else "", hp.val_files, hp.test_files])
    train_tokens = load_tokens(hp.train_files, hp.vocab_size, "train") if need_train else np.zeros(0, np.uint16)
    val_tokens = load_tokens(hp.val_files, hp.vocab_size, "validation")
    if hp.test_files:
        load_tokens(hp.test_files, hp.vocab_size, "test")  # headers checked before check_data_files reads them
    check_data_files(hp, need_train)
    if hp.train_tokens:
        train_tokens = truncate_to_document(train_tokens, hp.train_tokens, hp.bos_id, hp.train_files)
    if need_train and train_tokens.size < hp.seq_len + 1:
        raise DataError(f"{hp.train_files}: {train_tokens.size:,} train tokens"
                        f"{' after --train_tokens ' + str(hp.train_tokens) if hp.train_tokens else ''}, fewer than "
                        f"one sequence of seq_len + 1 = {hp.seq_len + 1}")
    fitness_data = None
    if hp.fitness_tokens and need_train:  # carved after the budget cut: selection data comes out of the budget
        fitness_tokens, train_tokens = carve_fitness_slice(train_tokens, hp.fitness_tokens, hp.bos_id, hp.train_files)
        fitness_data = EvalData(fitness_tokens, hp.seq_len, f"{hp.train_files} (fitness slice)")
    if hp.val_tokens:
        val_tokens = val_tokens[:hp.val_tokens]
    test_data = EvalData(load_tokens(hp.test_files, hp.vocab_size, "test"), hp.seq_len, hp.test_files) \
        if hp.test_files else None
    return RunData(train_tokens, val_tokens, EvalData(val_tokens, hp.seq_len, hp.val_files), test_data, fitness_data)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the tokens' own frequencies: the best loss any context-free model could reach on them,
    an oracle bound (it peeks at the val counts), not a baseline."""
    counts = np.bincount(tokens.astype(np.int64))
    probs = counts[counts > 0] / tokens.size
    return float(-(probs * np.log(probs)).sum())


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """The loss (nats/token) on val of the unigram model fitted to train: token frequencies with add-1/2
    (Krichevsky-Trofimov) smoothing so unseen tokens keep some mass. The baseline a trained model must clearly beat."""
    counts = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size)[:vocab_size] + 0.5
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_tokens[1:].astype(np.int64)].mean())


# Bits per byte: a loss in nats per token depends on the tokenizer; nats (or bits) per byte of the text do not, so
# tracks with different tokenizers (GPT-2 BPE, bytes) compare on this scale.


@functools.lru_cache(maxsize=None)
def token_bytes_table(tokenizer: str, bpe_file: str = "") -> dict[int, bytes] | None:
    """The bytes of text each token id stands for (the separator and padding ids are absent). Bytes: id i is byte i;
    GPT-2: the bundled data/gpt2.tiktoken; bpe: --bpe_file (both one `base64(token bytes) id` line per token). None
    when the file is missing."""
    if tokenizer == "bytes":
        return {i: bytes([i]) for i in range(256)}
    path = bpe_file if tokenizer == "bpe" else os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                             "gpt2.tiktoken")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return {int(rank): base64.b64decode(token) for token, rank in (line.split() for line in handle if line.strip())}


@functools.lru_cache(maxsize=None)
def token_byte_lengths(tokenizer: str, vocab_size: int, bpe_file: str = "") -> np.ndarray | None:
    """UTF-8 bytes of text each token id stands for (0 for the document separator and padding ids); None without
    the tokenizer's file."""
    table = token_bytes_table(tokenizer, bpe_file)
    if table is None:
        return None
    lengths = np.zeros(max(vocab_size, 257), dtype=np.int64)
    for token_id, token in table.items():
        if token_id < lengths.size:
            lengths[token_id] = len(token)
    return lengths


def text_bytes(tokens: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes of text the tokens decode to."""
    return int(lengths[tokens.astype(np.int64)].sum())


def bits_per_byte(loss: float, targets: int, num_bytes: int) -> float:
    """Mean nats per token over `targets` tokens -> bits per byte of the text they decode to: loss * targets is the
    total in nats, spread over the bytes (a separator costs its loss but holds no byte)."""
    return loss * targets / num_bytes / math.log(2)


def run_bits_per_byte(hp: Hyperparameters, data: RunData, val_loss: float, test_loss: float | None,
                      unigram: float) -> dict:
    """result.json's bits-per-byte fields: val, test and the unigram baseline (None without the GPT-2 vocab file)."""
    lengths = token_byte_lengths(hp.tokenizer, hp.vocab_size, hp.bpe_file)
    if lengths is None:
        return dict(val_bpb=None, test_bpb=None, unigram_val_bpb=None, val_bytes=None)
    val_targets = data.val_data.tokens[1:data.val_data.num_targets + 1]
    val_bytes = text_bytes(val_targets, lengths)
    test_bpb = None
    if test_loss is not None:
        test_targets = data.test_data.tokens[1:data.test_data.num_targets + 1]
        test_bpb = bits_per_byte(test_loss, data.test_data.num_targets, text_bytes(test_targets, lengths))
    return dict(val_bpb=bits_per_byte(val_loss, data.val_data.num_targets, val_bytes), test_bpb=test_bpb,
                unigram_val_bpb=bits_per_byte(unigram, data.val_tokens.size - 1,
                                              text_bytes(data.val_tokens[1:], lengths)),
                val_bytes=val_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# Model: a modern GPT (nanochat lineage): RMSNorm pre-norm, RoPE, QK-norm, ReLU^2 or SwiGLU, logit soft-cap


# The Recipe fields that decide the architecture: what GPT(config) builds and a member file stores to rebuild its
# model. GPTConfig is made from this list, each field with its Recipe default (documented there), so a member file
# written before a field existed loads as the plain model on that point.
MODEL_FIELDS = (
    "vocab_size", "bos_id", "seq_len", "n_layer", "n_embd", "n_head", "mlp", "mlp_ratio", "mlp_hidden", "rope_base",
    "rope_pairs", "logit_softcap", "dropout", "dropout_mlp", "proj_init", "train_vocab", "eval_vocab",
    # model tricks: each at its default leaves the plain model
    "value_proj", "value_embed_tables", "unet_skips", "attn_gate", "out_gate_channels", "resid_mix",
    "resid_lambda_init", "xsa", "xsa_eps", "head_mix", "key_offset", "doc_mask", "stochastic_depth",
    "stochastic_depth_style", "mtp_weight", "mtp_style", "loop_repeats", "loop_range", "recurrence", "window_pattern",
    "window_short", "window_warmup_frac", "window_warmup_stages", "window_schedule", "yarn",
    # precision of the attention inputs and the RoPE tables
    "attn_qkv_bf16", "rope_tables",
)
GPTConfig = dataclasses.make_dataclass(
    "GPTConfig", [(name, Recipe.__dataclass_fields__[name].type,
                   dataclasses.field(default=Recipe.__dataclass_fields__[name].default)) for name in MODEL_FIELDS],
    frozen=True, namespace={"__doc__": "The architecture alone: the Recipe's MODEL_FIELDS (see there)."})
GPTConfig.__module__ = __name__


def model_config(hp: Hyperparameters) -> GPTConfig:
    """The run's architecture: its fields copied from the hyperparameters of the same names."""
    return GPTConfig(**{field.name: getattr(hp, field.name) for field in dataclasses.fields(GPTConfig)})


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights (nanochat): the scale is left to the next matrix."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float, pairs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (1, seq_len, 1, head_dim / 2) each, for rotary position embeddings (Su et al. 2021).
    pairs > 0: partial RoPE, only the first `pairs` frequencies, base^(-j/pairs), rotate; the others are 0, so those
    dimensions carry no position and stay free for content (the 15min record's half-truncated RoPE, tiny/train.py)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if pairs:
        inv_freq = torch.cat([1.0 / (base ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float32) / (2 * pairs))),
                              torch.zeros(head_dim // 2 - pairs, dtype=torch.float32)])
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def stored_rotary(table: torch.Tensor, storage: str) -> torch.Tensor:
    """A float32 RoPE table as rope_tables stores it: "" itself, "bf16" rounded to a bf16 tensor, "bf16_values"
    rounded to bf16 and held in float32."""
    if storage == "bf16":
        return table.bfloat16()
    return table.bfloat16().float() if storage == "bf16_values" else table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x1, x2) of the last dimension of x (B, T, H, D) by position-dependent angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


GATE_CHANNELS = 32  # the value gates read the first 32 channels of their input (the output gate: out_gate_channels)


def scalar_parameter(initial: torch.Tensor) -> nn.Parameter:
    """A gate, lambda or mixing matrix, at its initial value: marked for AdamW's scalar group (build_optimizers reads
    the mark), never Muon, whose orthogonalised update would throw away its scale. The mark is an attribute of the
    parameter, so build the optimizers on the model as built (copy.deepcopy of a Parameter drops attributes)."""
    param = nn.Parameter(initial)
    param.scalar_group = True
    return param


def has_value_proj(layer: int, n_layer: int) -> bool:
    """Alternating layers, always including the last one (slowrun's has_ve)."""
    return layer % 2 == (n_layer - 1) % 2


def exclusive_self_attention(y: torch.Tensor, v: torch.Tensor, strength, eps: float = 1e-12) -> torch.Tensor:
    """Exclusive Self Attention (XSA): removes from each head's output y (B, T, H, D) its component along the token's
    own normalised value vector v_hat, y - s (y . v_hat) v_hat, so attention carries only what the token itself does
    not already hold. strength s is 1 or a (H,) vector of tanh(alpha); v_hat = v / max(|v|, eps)."""
    v_hat = F.normalize(v, dim=-1, eps=eps)
    along = (y * v_hat).sum(dim=-1, keepdim=True)  # (B, T, H, 1)
    if isinstance(strength, torch.Tensor):
        along = along * strength.view(-1, 1)
    return y - along * v_hat


def shift_key_half(k: torch.Tensor) -> torch.Tensor:
    """Partial key offset (the 15min record, tiny/train.py): keys (B, T, H, D) whose second half of dimensions is
    the previous position's (position 0 keeps its own), so a query matching that half attends to the token *after*
    the one it looks for: a one-layer induction head."""
    half = k.size(-1) // 2
    previous = torch.cat([k[:, :1, :, half:], k[:, :-1, :, half:]], dim=1)
    return torch.cat([k[..., :half], previous], dim=-1)


class CausalSelfAttention(nn.Module):
    # () = SDPA's head_dim^-0.5; yarn sets (its scale,) on every attention module. A tuple because torch.compile keeps
    # a module's tuple of constants static: a changed float attribute is first retraced as a symbolic float
    softmax_scale: tuple[float, ...] = ()

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # --- tricks (value_proj, attn_gate, head_mix, xsa): each None unless its flag is on ---
        self.gate_channels = min(GATE_CHANNELS, config.n_embd)
        self.out_gate_channels = min(config.out_gate_channels, config.n_embd)  # the 1h record's output gate reads 12
        self.c_x0v = self.value_gate = self.out_gate = self.head_mix = self.xsa_alpha = None
        if config.value_proj and has_value_proj(layer, config.n_layer):
            self.c_x0v = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.value_gate = scalar_parameter(torch.zeros(config.n_head, self.gate_channels))
        if config.value_embed_tables and has_value_proj(layer, config.n_layer):  # the table lives in GPT.value_embeds
            self.value_gate = scalar_parameter(torch.zeros(config.n_head, self.gate_channels))
        if config.attn_gate:
            self.out_gate = scalar_parameter(torch.zeros(config.n_head, self.out_gate_channels))
        if config.head_mix:  # [0], [1], [2] mix the heads of Q, K and V
            self.head_mix = scalar_parameter(torch.eye(config.n_head).repeat(3, 1, 1))
        if config.xsa == "learned":
            self.xsa_alpha = scalar_parameter(torch.zeros(config.n_head))
        self.xsa, self.xsa_eps = config.xsa, config.xsa_eps
        # the 15min record's partial key offset: on long-window ("L") layers and the last one (never the MTP block)
        pattern = config.window_pattern.upper()
        self.key_offset = config.key_offset and bool(pattern) and layer < config.n_layer and (
            layer == config.n_layer - 1 or pattern[layer % len(pattern)] == "L")
        self.qkv_bf16 = config.attn_qkv_bf16
        self.rotate_float32 = config.rope_tables == "bf16_values"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x0: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, time_steps, width = x.shape
        q = self.c_q(x).view(batch, time_steps, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(batch, time_steps, self.n_head, self.head_dim)
        v = self.c_v(x).view(batch, time_steps, self.n_head, self.head_dim)
        if self.head_mix is not None:  # head h reads sum_g M[h, g] * head g (interleaved head attention)
            mix = self.head_mix.to(q.dtype)
            q, k, v = (torch.einsum("hg,btgd->bthd", mix[i], t) for i, t in enumerate((q, k, v)))
        if self.value_gate is not None:  # value residual, gated per head in [0, 2]: W x0 (value_proj) or, with
            # value_embed_tables, the table row E_l[idx] that run_layers hands over in x0's place (the baseline record)
            gate = 2 * torch.sigmoid(F.linear(x[..., :self.gate_channels], self.value_gate.to(x.dtype)))  # (B, T, H)
            value = self.c_x0v(x0) if self.c_x0v is not None else x0.to(v.dtype)
            v = v + gate.unsqueeze(-1) * value.view(batch, time_steps, self.n_head, self.head_dim)
        if self.rotate_float32:  # the 2h record's float32 tables promote its bf16 q, k: the rotation runs in float32
            q, k = q.float(), k.float()
        # QK-norm after RoPE keeps attention logits bounded (Dehghani et al. 2023; nanochat)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        # from torch 2.12 CUDA autocast runs rms_norm in fp32: back to v's (the compute) dtype, so attention runs and
        # saves bf16 q/k as the records do; a no-op in fp32
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.key_offset:
            k = shift_key_half(k)
        # qkv_bf16: the 2h record hands its FA3 call bf16 q, k, v whatever they were (float32 on a CPU); the output
        # comes back to v's dtype, exactly (XSA still reads the uncast v). Otherwise every .to here is a no-op
        attn_dtype = torch.bfloat16 if self.qkv_bf16 else v.dtype
        # attn_mask: None (causal), a boolean SDPA mask (windows, documents) or a FlexAttention BlockMask
        scale = dict(scale=self.softmax_scale[0]) if self.softmax_scale else {}  # YaRN's (2h record)
        y = attend(q.transpose(1, 2).to(attn_dtype), k.transpose(1, 2).to(attn_dtype),
                   v.transpose(1, 2).to(attn_dtype), attn_mask, **scale)
        y = y.transpose(1, 2).to(v.dtype)  # (B, H, T, D) -> (B, T, H, D)
        if self.xsa:
            strength = 1.0 if self.xsa_alpha is None else torch.tanh(self.xsa_alpha).to(y.dtype)
            y = exclusive_self_attention(y, v, strength, self.xsa_eps)
        if self.out_gate is not None:  # sigmoid(0) = 1/2 at init; lets a head switch itself off per token
            y = y * torch.sigmoid(F.linear(x[..., :self.out_gate_channels], self.out_gate.to(x.dtype))).unsqueeze(-1)
        return self.c_proj(y.reshape(batch, time_steps, width))  # (B, T, H, D) -> (B, T, C)


def mlp_hidden_width(config: GPTConfig) -> int:
    """ReLU^2 uses mlp_ratio * n_embd; SwiGLU's three matrices use 2/3 of that, rounded up to a multiple of 64;
    mlp_hidden, when set, is the width itself (the public records round 8 d / 3 up to 256 instead: 4864 at 1792)."""
    if config.mlp_hidden:
        return config.mlp_hidden
    hidden = config.mlp_ratio * config.n_embd * (2 / 3 if config.mlp == "swiglu" else 1)
    return 64 * math.ceil(hidden / 64)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, hidden = config.mlp, mlp_hidden_width(config)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=False) if config.mlp == "swiglu" else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.c_gate is not None:
            return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(config, layer), MLP(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.mlp_dropout = self.dropout if config.dropout_mlp else nn.Identity()  # 15min: the attention branch only
        # stochastic depth: drop probability grows linearly with depth (Huang et al. 2016)
        self.drop_prob = config.stochastic_depth * (layer + 1) / config.n_layer
        self.drop_whole_batch = config.stochastic_depth_style == "batch"
        if self.drop_whole_batch:  # slowrun 1h: p l / (L - 1), layer 0 never dropped, the MTP block (l = L) above p
            self.drop_prob = config.stochastic_depth * layer / max(config.n_layer - 1, 1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x0: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.drop_whole_batch and self.drop_prob > 0 and self.training:
            # one draw for the whole micro-batch, no 1/(1-p) rescale: x_in + keep (block(x_in) - x_in), as the 1h
            # record computes it (a blend, not a branch, so torch.compile sees one graph)
            keep = (torch.rand((), device=x.device) >= self.drop_prob).to(x.dtype)
            x_in = x
            x = x + self.dropout(self.attn(rms_norm(x), cos, sin, x0, attn_mask))
            x = x + self.mlp_dropout(self.mlp(rms_norm(x)))
            return x_in + keep * (x - x_in)
        if self.drop_prob > 0 and self.training:  # keep the whole block for a sequence or drop it; rescale kept ones
            keep = (torch.rand(x.size(0), 1, 1, device=x.device) >= self.drop_prob).to(x.dtype) / (1 - self.drop_prob)
            x = x + keep * self.dropout(self.attn(rms_norm(x), cos, sin, x0, attn_mask))
            return x + keep * self.mlp_dropout(self.mlp(rms_norm(x)))
        x = x + self.dropout(self.attn(rms_norm(x), cos, sin, x0, attn_mask))
        return x + self.mlp_dropout(self.mlp(rms_norm(x)))


def loop_layer_range(config: GPTConfig | Hyperparameters) -> tuple[int, int]:
    """The layers [a, b) that looped layers replay: loop_range "a:b", or the middle third."""
    if not config.loop_range:
        return config.n_layer // 3, max(config.n_layer // 3 + 1, 2 * config.n_layer // 3)
    try:
        start, stop = (int(part) for part in config.loop_range.split(":"))
    except ValueError:
        raise ConfigError(f"loop_range must look like 'a:b', got {config.loop_range!r}") from None
    return start, stop


def window_sizes(config: GPTConfig) -> list[int] | None:
    """Each layer's attention window in tokens from window_pattern (cycled; the last layer always long), or None."""
    if not config.window_pattern:
        return None
    short = config.window_short or config.seq_len // 2
    sizes = [short if config.window_pattern.upper()[i % len(config.window_pattern)] == "S" else config.seq_len
             for i in range(config.n_layer)]
    sizes[-1] = config.seq_len
    return sizes


def scaled_window_sizes(full_sizes: list[int], stage: int, stages: int) -> list[int]:
    """The window schedule's sizes at stage 0..stages-1: each window at (stage + 1) / stages of its full size
    (rounded up). Short windows early make the first steps cheaper and, in modded-nanogpt's records, train local
    structure first; few stages keep torch.compile to a few graphs (one per distinct size set)."""
    return [math.ceil(full * (stage + 1) / stages) for full in full_sizes]


def window_stage(step: int, total_steps: int, hp: Hyperparameters) -> int:
    """Which stage of the window schedule a step is in: equal slices of the first window_warmup_frac of training,
    the last stage (full windows) from then on."""
    warmup_steps = hp.window_warmup_frac * total_steps
    if step >= warmup_steps:
        return hp.window_warmup_stages - 1
    return min(hp.window_warmup_stages - 1, int(step / warmup_steps * hp.window_warmup_stages))


def sliding_window_mask(time_steps: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) boolean: query i sees keys j with i - window < j <= i. A plain SDPA mask (FlexAttention is the other path)."""
    return attention_mask_dense(time_steps, window, None, device)


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Logit soft-capping, cap tanh(logits / cap) (Gemma 2, 2024; the slowrun records use 10 and 15), the identity
    at cap 0: every PyTorch path's one home (the fused loss's Triton kernel and ChunkedSoftcapCE write it in their
    own form, tested against this)."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attention: str = "sdpa"):
        """config: the architecture (model_config(hp) for a run's); attention: "sdpa" or "flex", the caller's choice
        (attention_backend decides it for a training run)."""
        super().__init__()
        self.config = config
        self.logit_softcap = config.logit_softcap
        # the softmax's columns in training and in evaluation (0 = all): the padded rows past 50,257 get no mass
        self.train_vocab, self.eval_vocab = config.train_vocab, config.eval_vocab
        self.proj_init = config.proj_init
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte (nanochat)
        cos, sin = rotary_tables(config.seq_len, config.n_embd // config.n_head, config.rope_base, config.rope_pairs)
        self.register_buffer("rotary_cos", stored_rotary(cos, config.rope_tables), persistent=False)
        self.register_buffer("rotary_sin", stored_rotary(sin, config.rope_tables), persistent=False)
        # --- tricks that change the layer loop: built only when their flag is on ---
        self.resid_mix, self.unet_skips = config.resid_mix, config.unet_skips
        self.encoder_layers = config.n_layer // 2
        self.full_window_sizes = self.window_sizes = window_sizes(config)  # window_sizes: the current stage's
        self.loop_repeats = config.loop_repeats
        self.loop_range = loop_layer_range(config) if config.loop_repeats else (0, 0)
        self.loop_active = False  # set by the training loop from loop_start_step (loop_start_epoch or _frac)
        # the 15min record's recurrence: all `recurrence` passes while active (a built or loaded model), one pass
        # with the same final norms before recurrence_start_frac (the training loop sets it per step)
        self.recurrence, self.recurrence_active = config.recurrence, True
        self.uses_x0 = config.value_proj or config.resid_mix
        self.attention, self.doc_mask, self.bos_id = attention, config.doc_mask, config.bos_id
        # FlexAttention block masks that depend on the shape alone are built once, here, for the training length
        self.static_block_masks, self.seq_len = {}, config.seq_len
        if self.attention == "flex" and not config.doc_mask and torch.get_default_device().type != "meta":
            every_stage = [self.window_sizes or [config.seq_len]] + window_schedule_sizes(config) + [
                scaled_window_sizes(self.full_window_sizes, stage, config.window_warmup_stages)
                for stage in range(config.window_warmup_stages) if config.window_warmup_frac]
            self.static_block_masks = {w: flex_block_mask(config.seq_len, w, None, torch.get_default_device())
                                       for w in set(sum(every_stage, []))}
        if config.resid_mix:
            self.resid_lambdas = scalar_parameter(torch.full((config.n_layer,), config.resid_lambda_init))
            self.x0_lambdas = scalar_parameter(torch.full((config.n_layer,), 0.1))
        if config.unet_skips:
            self.skip_weights = scalar_parameter(torch.ones(config.n_layer - self.encoder_layers))
        self.value_embeds = None
        if config.value_embed_tables:  # the baseline record's value embeddings (F17): one vocab x n_embd table per
            # value layer (alternating, the last included), trained by AdamW like wte
            layers = [layer for layer in range(config.n_layer) if has_value_proj(layer, config.n_layer)]
            self.value_embeds = nn.ModuleDict({str(layer): nn.Embedding(config.vocab_size, config.n_embd)
                                               for layer in layers})
        self.mtp_weight, self.mtp_block = config.mtp_weight, None
        if config.mtp_weight > 0 and config.mtp_style == "block":  # the 1h record's MTP (#16): y_{t+1} from an extra
            # Block (layer index n_layer: full window, no value projection) on W [h_t ; rms_norm(wte(y_t))]
            self.mtp_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
            self.mtp_block = Block(config, config.n_layer)
        elif config.mtp_weight > 0:  # hidden state for token t+2 = h + W rms_norm(h), W zero-init; shares the lm_head
            self.mtp_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.window_schedule:  # the 2h record's windows (and YaRN) of epoch 1
            set_window_schedule_stage(self, 0)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nanochat's init of the matrices: unit-variance embedding, tiny lm_head, uniform hidden matrices, zero
        output projections (each block starts as the identity, so depth does not blow up the residual stream). The
        tricks' gates and lambdas take their initial values where they are made (scalar_parameter)."""
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in [*self.blocks, *([self.mtp_block] if self.mtp_block is not None else [])]:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc, block.mlp.c_gate,
                           block.attn.c_x0v):
                if linear is not None:
                    bound = 3**0.5 * linear.in_features**-0.5
                    nn.init.uniform_(linear.weight, -bound, bound)
            if self.proj_init == "normal":  # the 1h record (#14): std n_embd^-0.5 for both, the MLP's fan-in too
                nn.init.normal_(block.attn.c_proj.weight, std=self.config.n_embd**-0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=self.config.n_embd**-0.5)
            else:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)
        if self.mtp_block is not None:  # the 1h record's bound: sqrt(3) n_embd^-0.5, not the fan-in 2 n_embd
            bound = 3**0.5 * self.config.n_embd**-0.5
            nn.init.uniform_(self.mtp_proj.weight, -bound, bound)
        elif self.mtp_weight > 0:
            nn.init.zeros_(self.mtp_proj.weight)
        for table in (self.value_embeds.values() if self.value_embeds is not None else []):
            bound = 3**0.5 * self.config.n_embd**-0.5  # the baseline record's U(+-sqrt(3 / n_embd))
            nn.init.uniform_(table.weight, -bound, bound)

    def layer_order(self) -> list[int]:
        """The blocks in execution order: 0..n-1, with loop_range replayed loop_repeats extra times once active."""
        order = list(range(len(self.blocks)))
        if self.loop_repeats and self.loop_active:
            start, stop = self.loop_range
            order = order[:stop] + list(range(start, stop)) * self.loop_repeats + order[stop:]
        return order

    def set_window_stage(self, stage: int, stages: int) -> None:
        """The window schedule: stage stages - 1 (the default, and every saved model's) is the full windows."""
        self.window_sizes = scaled_window_sizes(self.full_window_sizes, stage, stages)

    def attention_masks(self, idx: torch.Tensor) -> dict:
        """{window: mask} for the layers' windows (the full length when there are none), built once per forward and
        shared by the layers: a BlockMask on the flex path; on SDPA a boolean mask, or None (plain causal) where the
        window covers the sequence and documents are not masked."""
        time_steps = idx.size(1)
        documents = document_ids(idx, self.bos_id) if self.doc_mask else None
        windows = set(self.window_sizes or [time_steps])
        if self.attention == "flex":
            static = self.static_block_masks if documents is None and time_steps == self.seq_len else {}
            return {w: static[w] if w in static else flex_block_mask(time_steps, min(w, time_steps), documents,
                                                                     idx.device) for w in windows}
        return {w: attention_mask_dense(time_steps, w, documents, idx.device) for w in windows
                if w < time_steps or documents is not None}

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   idx: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The layer loop with the tricks: x0 mixing, U-Net skips, value projections, windows, document masks,
        looped layers. Each replayed pass re-adds its skip and its x0 mix; an encoder layer's latest output is the
        skip it hands on. x0: what the x0 mix and the value projections read (None: x itself, the embedding)."""
        x0, n_layer = (x if x0 is None else x0), len(self.blocks)
        masks = {}
        if self.window_sizes is not None or self.doc_mask or self.attention == "flex":
            masks = self.attention_masks(idx)
        skips: dict[int, torch.Tensor] = {}
        for layer in self.layer_order():
            if self.unet_skips and layer >= n_layer - self.encoder_layers and n_layer - 1 - layer in skips:
                x = x + self.skip_weights[layer - (n_layer - self.encoder_layers)] * skips[n_layer - 1 - layer]
            if self.resid_mix:
                x = self.resid_lambdas[layer] * x + self.x0_lambdas[layer] * x0
            window = self.window_sizes[layer] if self.window_sizes is not None else x.size(1)
            x = self.blocks[layer](x, cos, sin, self.value_source(layer, idx, x0), masks.get(window))
            if self.unet_skips and layer < self.encoder_layers:
                skips[layer] = x
        return x

    def value_source(self, layer: int, idx: torch.Tensor | None, x0: torch.Tensor) -> torch.Tensor | None:
        """What a block's attention receives as x0: the layer's value-table rows E_l[idx] with value_embed_tables
        (on its value layers), else x0 where value_proj or resid_mix use it."""
        if self.value_embeds is not None and str(layer) in self.value_embeds:
            return self.value_embeds[str(layer)](idx)
        return x0 if self.uses_x0 else None

    def residual_stream(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the final residual stream (B, T, C), before the last norm."""
        time_steps = idx.size(1)
        cos, sin = self.rotary_cos[:, :time_steps], self.rotary_sin[:, :time_steps]
        if self.recurrence > 1:
            return self.recurrent_stream(rms_norm(self.wte(idx)), cos, sin, idx)
        return self.run_layers(rms_norm(self.wte(idx)), cos, sin, idx)  # (B, T, C) in and out

    def recurrent_stream(self, x0: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         idx: torch.Tensor) -> torch.Tensor:
        """The 15min record's recurrence (tiny/train.py GPT.forward): the whole stack runs `recurrence` times (once
        before recurrence_start_frac), x <- rms_norm(run_layers(x)), every pass re-reading the embedding x0. In
        training all passes but the last run without gradients: a deeper model for the cost of one backward. The
        returned stream is already normed; features() norms it again, as the record does."""
        x = x0
        for _ in range((self.recurrence if self.recurrence_active else 1) - 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.training):
                x = rms_norm(self.run_layers(x, cos, sin, idx, x0=x0))
        return rms_norm(self.run_layers(x, cos, sin, idx, x0=x0))

    def for_inference(self) -> "GPT":
        """A frozen model (teacher, snapshot, saved member) runs eagerly, where FlexAttention falls back to
        materialising every score: SDPA with the same dense mask gives the same output faster, so switch to it."""
        self.attention = "sdpa"
        return self.eval().requires_grad_(False)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the final normalised residual stream (B, T, C), the lm_head's input (a distillation
        teacher hands these over, so its logits can be made chunk by chunk)."""
        return rms_norm(self.residual_stream(idx))

    def logits(self, x: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Residual stream (..., C) -> float32 logits (..., vocab_size) (raw: the lm_head's output, see head)."""
        return self.head(rms_norm(x), raw)

    def head(self, features: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """Features (..., C) -> float32 logits (..., vocab_size), soft-capped; raw=True returns the lm_head's output
        in its own dtype (bf16 under autocast), uncapped: the fused loss caps it tile by tile (Kernels). With
        train_vocab / eval_vocab only the first that many columns (a view: rows keep the full stride)."""
        if raw == "features":  # the lm_head's input itself: the fp8 loss (fp8_head) multiplies it by the head
            return features
        output = self.lm_head(features)
        columns = self.train_vocab if self.training else self.eval_vocab
        if columns:
            output = output[..., :columns]
        if raw:
            return output
        return soft_cap(output.float(), self.logit_softcap)

    def mtp_block_logits(self, x: torch.Tensor, targets: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """The block MTP's logits for y_{t+1}, (B, T-1, vocab): the final features h_t and the next token's normed
        embedding, concatenated, projected to n_embd and run through the MTP block (RoPE positions 0..T-2, causal),
        then the shared final norm and lm_head (slowrun 1h train.py GPT.forward). Targets of -1 embed token 0."""
        combined = self.mtp_proj(torch.cat([rms_norm(x)[:, :-1], rms_norm(self.wte(targets[:, :-1].clamp(min=0)))],
                                           dim=-1))
        time_steps = combined.size(1)
        out = self.mtp_block(combined, self.rotary_cos[:, :time_steps], self.rotary_sin[:, :time_steps])
        return self.logits(out, raw)

    def forward(self, idx: torch.Tensor, raw_logits: bool = False, targets: torch.Tensor | None = None):
        """Token ids (B, T) -> float32 logits (B, T, vocab_size); in training with mtp_weight > 0, the pair
        (logits, logits for token t+2), or with mtp_style block and targets given, (logits, (B, T-1, vocab) logits
        for y_{t+1}). raw_logits: the lm_head's uncapped output instead, for the fused loss."""
        x = self.residual_stream(idx)
        if self.mtp_block is not None and self.training:
            if targets is None:  # the block needs the next tokens: without them, the plain logits
                return self.logits(x, raw_logits)
            return self.logits(x, raw_logits), self.mtp_block_logits(x, targets, raw_logits)
        if self.mtp_weight > 0 and self.training:
            return self.logits(x, raw_logits), self.logits(x + self.mtp_proj(rms_norm(x)), raw_logits)
        return self.logits(x, raw_logits)


# --- the 2h record's window schedule and YaRN (records/TRACKS.md F15) ---


def parse_window_schedule(text: str, seq_len: int = 0) -> list[tuple[int, int, int, int]]:
    """window_schedule "a-b:short,long;..." -> [(first epoch, last epoch, short, long)], windows in keys; the stages
    cover epochs 1, 2, ... in order, 0 < short <= long (<= seq_len when given: a run's check; a model takes a longer
    window as the whole sequence). Anything else: a one-line ConfigError."""
    stages: list[tuple[int, int, int, int]] = []
    for part in (piece.strip() for piece in text.split(";")):
        epochs, _, windows = part.partition(":")
        try:
            first, _, last = epochs.partition("-")
            first, last = int(first), int(last or first)
            short, long = (int(window) for window in windows.split(","))
        except ValueError:
            raise ConfigError(f"window_schedule stage {part!r} must look like 'a-b:short,long' (epochs a to b, "
                              f"windows in keys)") from None
        expected = stages[-1][1] + 1 if stages else 1
        require(first == expected and last >= first, f"window_schedule stage {part!r}: the stages must cover epochs "
                f"1, 2, ... in order, without gaps or overlaps (this one should start at epoch {expected})")
        require(0 < short <= long <= (seq_len or long), f"window_schedule stage {part!r}: the windows need 0 < short "
                f"<= long <= seq_len ({seq_len})")
        stages.append((first, last, short, long))
    return stages


def window_schedule_stage(stages: list[tuple[int, int, int, int]], epoch: int) -> int:
    """The stage (0-based) of a 1-based epoch: the one whose epochs contain it; past the last, the last."""
    return next((index for index, stage in enumerate(stages) if epoch <= stage[1]), len(stages) - 1)


def stage_window_sizes(config: GPTConfig, short: int, long: int) -> list[int]:
    """Each layer's window in one stage: window_pattern's letters cycled, the last layer long (the 2h record's
    _compute_window_sizes: at stage 1 even the last layer sees only `long` keys)."""
    pattern = config.window_pattern.upper()
    return [short if pattern[layer % len(pattern)] == "S" and layer < config.n_layer - 1 else long
            for layer in range(config.n_layer)]


def window_schedule_sizes(config: GPTConfig) -> list[list[int]]:
    """Every stage's window sizes ([] without a schedule): the FlexAttention masks to build once."""
    if not config.window_schedule:
        return []
    return [stage_window_sizes(config, short, long)
            for _, _, short, long in parse_window_schedule(config.window_schedule)]


def yarn_window(window: int, seq_len: int) -> int:
    """Our window (keys) in the public's units, which its YaRN ratios use: the FA3 window = keys - 1, and a full
    window written as the sequence length (the 2h record's 2048)."""
    return seq_len if window >= seq_len else window - 1


def yarn_growths(stages: list[tuple[int, int, int, int]], stage: int, seq_len: int) -> list[tuple[int, int]]:
    """The long window's growths (old, new), public units, from stage 0 up to `stage`: YaRN applies one per growth."""
    longs = [yarn_window(entry[3], seq_len) for entry in stages[:stage + 1]]
    return [(old, new) for old, new in zip(longs, longs[1:]) if new != old]


def yarn_inv_freq(inv_freq: torch.Tensor, old: int, new: int, alpha: float = 1.0, beta: float = 32.0) -> torch.Tensor:
    """YaRN's frequency rescale for a context grown from old to new (Peng et al. 2023; the 2h record's Yarn.apply):
    a pair that turns fewer than alpha times over the old window is interpolated by old/new, one that turns more
    than beta times is kept, a linear ramp between."""
    rotations = old * inv_freq / (2 * math.pi)
    ratio = old / new
    ramp = ((rotations - alpha) / (beta - alpha)).clamp(0, 1)
    return inv_freq * (ratio + ramp * (1 - ratio))


def yarn_softmax_scale(scale: float, old: int, new: int) -> float:
    """YaRN's attention temperature: the softmax scale times 0.2 ln(new / old) + 1 (the 2h record's factor)."""
    return scale * (0.2 * math.log(new / old) + 1)


def yarn_rotary(seq_len: int, head_dim: int, base: float, growths: list[tuple[int, int]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The cos and sin tables (as rotary_tables) and the softmax scale after the YaRN growths in turn."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    scale = head_dim**-0.5
    for old, new in growths:
        inv_freq, scale = yarn_inv_freq(inv_freq, old, new), yarn_softmax_scale(scale, old, new)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :], scale


@torch.no_grad()
def set_window_schedule_stage(model: "GPT", stage: int) -> None:
    """Puts a model in one stage of its window schedule: the stage's windows and, with yarn, the RoPE tables and
    softmax scale after every growth of the long window up to it (recomputed from the base frequencies: the state
    is a function of the stage alone, so resumed, frozen and reloaded models get it exactly)."""
    config = model.config
    stages = parse_window_schedule(config.window_schedule)
    model.window_sizes = stage_window_sizes(config, stages[stage][2], stages[stage][3])
    model.window_stage = stage
    if not config.yarn:
        return
    growths = yarn_growths(stages, stage, config.seq_len)
    cos, sin, scale = yarn_rotary(config.seq_len, config.n_embd // config.n_head, config.rope_base, growths,
                                  model.rotary_cos.device)
    if growths != getattr(model, "yarn_growths", []):  # none yet: the tables are rotary_tables' own
        model.rotary_cos.copy_(stored_rotary(cos, config.rope_tables))
        model.rotary_sin.copy_(stored_rotary(sin, config.rope_tables))
    model.yarn_growths = growths
    for module in model.modules():  # every attention call, the MTP block's included
        if isinstance(module, CausalSelfAttention):
            module.softmax_scale = (scale,)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers: Muon for the hidden matrices, AdamW for embedding, lm_head and scalars


# The orthogonalisers: quintic iterations x <- a x + (b G + c G G) x from x = grad / (|grad|_F * safety + eps), with
# one (a, b, c) per iteration (the last repeats). Both aim at U V^T of grad = U S V^T.
ORTHOGONALIZERS = {
    # Newton-Schulz (Jordan et al. 2024, Muon): one quintic whose coefficients push every singular value into roughly
    # [0.7, 1.2] in five steps rather than exactly to 1: what matters for the update is that no direction dominates.
    "newton_schulz": dict(coefficients=((3.4445, -4.7750, 2.0315),), safety=1.0, eps=1e-7),
    # Polar Express (Amsel et al. 2025, "The Polar Express: Optimal Matrix Sign Methods"): a different quintic per
    # iteration, each minimax-optimal for the interval the singular values occupy after the previous one; the values
    # used by the slowrun records (5 iterations, safety factor 1.02 in the normalisation).
    "polar_express": dict(coefficients=(
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ), safety=1.02, eps=1e-6),
}


def quintic_step(x: torch.Tensor, a: float, b: float, c: float, gram=None) -> torch.Tensor:
    """x <- a x + (b G + c G G) x with G = x x^T. Both G and G G = G G^T are symmetric, which a `gram` function
    (symmetric_gram_triton: half the products) exploits; None is the plain matmul reference."""
    if gram is None:
        g = x @ x.mT
        return a * x + (b * g + c * g @ g) @ x
    g = gram(x)
    return a * x + gram(g, c, g, b) @ x


def orthogonalize(grad: torch.Tensor, steps: int, method: str, gram=None) -> torch.Tensor:
    """Approximates U V^T of grad with the ORTHOGONALIZERS entry `method`. bf16 on GPU (tensor cores); float32 on
    CPU."""
    table = ORTHOGONALIZERS[method]
    x = grad.bfloat16() if grad.is_cuda else grad.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the short side: X X^T is then the smaller matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * table["safety"] + table["eps"])  # spectral norm <= Frobenius <= 1
    for step in range(steps):
        a, b, c = table["coefficients"][min(step, len(table["coefficients"]) - 1)]
        x = quintic_step(x, a, b, c, gram)
    if transposed:
        x = x.mT
    return x.to(grad.dtype)


def newton_schulz_orthogonalize(grad: torch.Tensor, steps: int, gram=None) -> torch.Tensor:
    return orthogonalize(grad, steps, "newton_schulz", gram)


def polar_express_orthogonalize(grad: torch.Tensor, steps: int, gram=None) -> torch.Tensor:
    return orthogonalize(grad, steps, "polar_express", gram)


def orthogonalize_bf16(grad: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """orthogonalize as the public slowrun records round it (muon_bf16), on every device: grad rounded to bf16 and
    kept there (the result is bf16), no transposition, the products in their order: G = x x^T for a wide or square x
    and x <- a x + (b G + c (G G)) x; G = x^T x for a tall one and x <- a x + x (b G + c (G G))."""
    table = ORTHOGONALIZERS[method]
    x = grad.to(torch.bfloat16)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * table["safety"] + table["eps"])
    tall = x.size(-2) > x.size(-1)
    for step in range(steps):
        a, b, c = table["coefficients"][min(step, len(table["coefficients"]) - 1)]
        if tall:
            g = x.mT @ x
            x = a * x + x @ (b * g + c * (g @ g))
        else:
            g = x @ x.mT
            x = a * x + (b * g + c * (g @ g)) @ x
    return x


def newton_schulz_orthogonalize_bf16(grad: torch.Tensor, steps: int) -> torch.Tensor:
    return orthogonalize_bf16(grad, steps, "newton_schulz")


def polar_express_orthogonalize_bf16(grad: torch.Tensor, steps: int) -> torch.Tensor:
    return orthogonalize_bf16(grad, steps, "polar_express")


def bf16_value(value: float) -> float:
    """A Python float as the records' optimizer sees it: stored in an fp32 0-d tensor, then rounded to bf16."""
    return torch.tensor(value, dtype=torch.float32).to(torch.bfloat16).item()


def normuon_rescale(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025): after orthogonalisation, divide each neuron's (row's, or column's for wide matrices)
    update by the root of an EMA of its mean square, then restore the update's Frobenius norm. Orthogonalised updates
    have equal singular values, not equal row norms; this evens out the per-neuron step sizes."""
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    mean_square = update.float().square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    scaled = update.float() * second_moment.clamp_min(1e-10).rsqrt()
    scaled = scaled * (update.float().norm() / scaled.norm().clamp_min(1e-10))
    return scaled.to(update.dtype)


def normuon_rescale_bf16(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """normuon_rescale as the public records compute and round it (muon_bf16): the EMA weight 1 - bf16(beta2), the
    norms from the sums of the neurons' mean squares (|u|^2 = n sum m, |scaled u|^2 = n sum m / s), one factor per
    neuron in float32, rounded to bf16 and applied to the bf16 update (the result is bf16)."""
    reduce_dim = -1 if update.size(-2) >= update.size(-1) else -2
    count = update.size(reduce_dim)
    mean_square = update.float().square().mean(dim=reduce_dim, keepdim=True)
    norm = (mean_square.sum(dim=(-2, -1), keepdim=True) * count).sqrt()
    second_moment.lerp_(mean_square, (1 - torch.tensor(beta2, dtype=torch.float32).to(torch.bfloat16)).item())
    inverse_root = second_moment.clamp_min(1e-10).rsqrt()
    scaled_norm = ((mean_square * count) * inverse_root.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    factor = inverse_root * (norm / scaled_norm.clamp_min(1e-10))
    return update.to(torch.bfloat16) * factor.to(torch.bfloat16)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024): SGD-momentum whose update is replaced by its
    nearest semi-orthogonal matrix, scaled by sqrt(max(1, rows/cols)), with decoupled weight decay.

    Under several ranks the orthogonalisation is split: parameters are grouped by shape, rank r orthogonalises
    parameters r, r + world, ... of each group and keeps their momentum (so momentum memory is sharded too), and
    all_gather hands every rank every update. Gradients must already be averaged over ranks."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool, ns_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, polar_express: bool = False, eq_r: bool = False,
                 normuon_beta2: float = 0.0, cautious_wd: bool = False, process_group=None, compiled: bool = False,
                 gram: str = "torch", wd_scaled: bool = False, gather_bf16: bool = False, bf16: bool = False):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]
        # variants (off by default): polar_express, eq_r (MuonEq-R), normuon_beta2 > 0 (NorMuon), cautious_wd,
        # wd_scaled (the shape factor on the decay too)
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, polar_express=polar_express, eq_r=eq_r,
                                      normuon_beta2=normuon_beta2, cautious_wd=cautious_wd, wd_scaled=wd_scaled))
        self.rank, self.world_size, self.process_group = rank, world_size, process_group
        # gather_bf16: the update rounded to bf16 before the all_gather (on any world size, so that 1 and N ranks
        # train alike); each rank applies the rounded update, its own included, so the ranks stay identical
        self.gather_dtype = torch.bfloat16 if gather_bf16 else None
        # bf16: the public records' rounding (muon_bf16; _update, _apply_bf16): updates come out of _update in
        # bf16 without the shape factor, which the step folds into the bf16-rounded lr
        self.bf16 = bf16
        if bf16 and gram == "triton":
            raise ValueError("Muon: bf16 (the records' order of products) has no symmetric Gram kernel path")
        # compiled: torch.compile fuses each iteration's scale-and-add into the matmuls' epilogues (modded-nanogpt
        # compiles its Newton-Schulz too); one graph per matrix shape, the plain functions are the reference
        self.orthogonalizers = {"newton_schulz": newton_schulz_orthogonalize,
                                "polar_express": polar_express_orthogonalize}
        if gram == "triton":  # the symmetric Gram kernel: half of X X^T's and G G^T's products (kept uncompiled)
            self.orthogonalizers = {name: functools.partial(fn, gram=symmetric_gram_triton)
                                    for name, fn in self.orthogonalizers.items()}
        if bf16:
            self.orthogonalizers = {"newton_schulz": newton_schulz_orthogonalize_bf16,
                                    "polar_express": polar_express_orthogonalize_bf16}
        if compiled and gram != "triton":
            self.orthogonalizers = {name: torch.compile(fn, dynamic=False)
                                    for name, fn in self.orthogonalizers.items()}

    def _update(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """The orthogonalised update of one matrix, times sqrt(max(1, rows/cols)). muon_bf16 (self.bf16): as the
        public records compute it, the momentum's weights rounded to float32 first (1 - m computed in float32), the
        bf16 orthogonaliser and NorMuon, and the bf16 update returned without the shape factor (_apply_bf16 folds it
        into the lr)."""
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buffer = state["momentum_buffer"]
        keep, take = group["momentum"], 1 - group["momentum"]
        if self.bf16:
            momentum = torch.tensor(group["momentum"], dtype=grad.dtype)
            keep, take = momentum.item(), (1 - momentum).item()
        buffer.lerp_(grad, take)
        direction = grad.lerp(buffer, keep) if group["nesterov"] else buffer
        if group["eq_r"]:  # MuonEq-R: every row to unit norm first (max(|row|, 1e-7), as the records), so no row dominates
            direction = direction / direction.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(direction.dtype)
        method = "polar_express" if group["polar_express"] else "newton_schulz"
        update = self.orthogonalizers[method](direction, group["ns_steps"])
        if group["normuon_beta2"] > 0:
            if "second_moment" not in state:
                reduce_dim = -1 if grad.size(-2) >= grad.size(-1) else -2
                shape = (grad.size(-2), 1) if reduce_dim == -1 else (1, grad.size(-1))
                state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=grad.device)
            rescale = normuon_rescale_bf16 if self.bf16 else normuon_rescale
            update = rescale(update, state["second_moment"], group["normuon_beta2"])
        return update if self.bf16 else update * max(1.0, param.size(-2) / param.size(-1)) ** 0.5

    @staticmethod
    def _apply_bf16(param: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        """param -= lr' u + lr' wd' (param [where u param >= 0, cautious_wd]) as the public records round it:
        lr' = bf16(lr sqrt(max(1, rows/cols))) (the decay's lr without the factor unless wd_scaled), wd' = bf16(wd),
        lr' u in bf16, the decay term in float32 from the bf16 product lr' wd'."""
        scale = max(1.0, param.size(-2) / param.size(-1)) ** 0.5
        lr = bf16_value(group["lr"] * scale)
        decay_lr = lr if group["wd_scaled"] else bf16_value(group["lr"])
        decay = (torch.tensor(decay_lr, dtype=torch.bfloat16) * bf16_value(group["weight_decay"])).item()
        update = update.to(torch.bfloat16)
        decay_term = decay * param
        if group["cautious_wd"]:
            decay_term = decay_term * ((update * param) >= 0)
        param.sub_(lr * update + decay_term)

    @torch.no_grad()
    def step(self) -> None:
        pending = []  # (communication handle or None, params, their updates)
        for group in self.param_groups:
            params = group["params"]
            for first in range(0, len(params), self.world_size):
                owned = first + self.rank
                # Ranks past the end of the group contribute a zero update that nobody applies.
                update = self._update(params[owned], group) if owned < len(params) else torch.zeros_like(
                    params[first], dtype=torch.bfloat16 if self.bf16 else None)
                if self.gather_dtype is not None:
                    update = update.to(self.gather_dtype)
                chunk = params[first:first + self.world_size]
                if self.world_size == 1:
                    pending.append((None, group, chunk, [update]))
                    continue
                gathered = [torch.empty_like(update) for _ in range(self.world_size)]
                handle = dist.all_gather(gathered, update, group=self.process_group, async_op=True)
                pending.append((handle, group, chunk, gathered))
        for handle, group, chunk, updates in pending:
            if handle is not None:
                handle.wait()
            for param, update in zip(chunk, updates):
                if self.bf16:
                    self._apply_bf16(param, update, group)
                    continue
                decay = group["lr"] * group["weight_decay"]
                if group["wd_scaled"]:  # the public records' lr_eff = lr sqrt(max(1, rows/cols)) scales both terms
                    decay = decay * max(1.0, param.size(-2) / param.size(-1)) ** 0.5
                if group["cautious_wd"]:  # decay only where the update already pulls towards zero (update*param >= 0)
                    param.sub_(param * (update * param >= 0), alpha=decay)
                else:
                    param.mul_(1 - decay)
                param.add_(update.to(param.dtype), alpha=-group["lr"])


# The public 1h record's scalar groups: which scalar parameter plays which part, by its attribute name
SCALAR_ROLES = {"resid_lambdas": "resid", "skip_weights": "resid", "x0_lambdas": "x0", "value_gate": "gate",
                "out_gate": "gate"}


def scalar_role(name: str) -> str:
    """"resid", "x0", "gate" or "" for a parameter's dotted name (the roles of SCALAR_ROLES)."""
    return SCALAR_ROLES.get(name.rsplit(".", 1)[-1], "")


def scalar_adam_groups(scalars: dict[str, nn.Parameter], hp: Hyperparameters) -> list[dict]:
    """AdamW groups (weight decay 0) of the scalar parameters: one at scalar_lr, with the public 1h record's split
    when its flags are on: resid lambdas and skip weights at scalar_lr * resid_lr_scale (0.01: they would otherwise
    move 100x faster than the record's), x0 lambdas with beta1 x0_beta1 (0.96); the 15min record's learned XSA
    strengths and output gates with their own betas (xsa_betas, out_gate_betas)."""
    own_betas = {"xsa_alpha": hp.xsa_betas, "out_gate": hp.out_gate_betas}  # the 15min record's groups (F5)

    def role_of(name: str) -> str:
        role, leaf = scalar_role(name), name.rsplit(".", 1)[-1]
        if own_betas.get(leaf):
            return leaf
        return role if (role == "resid" and hp.resid_lr_scale != 1.0) or (role == "x0" and hp.x0_beta1) else ""
    groups = [dict(params=[p for name, p in scalars.items() if role_of(name) == ""], lr=hp.scalar_lr, weight_decay=0.0),
              dict(params=[p for name, p in scalars.items() if role_of(name) == "resid"],
                   lr=hp.scalar_lr * hp.resid_lr_scale, weight_decay=0.0),
              dict(params=[p for name, p in scalars.items() if role_of(name) == "x0"], lr=hp.scalar_lr,
                   weight_decay=0.0, betas=(hp.x0_beta1, hp.adam_beta2))]
    groups += [dict(params=[p for name, p in scalars.items() if role_of(name) == leaf], lr=hp.scalar_lr,
                    weight_decay=0.0, betas=parse_betas(leaf, text)) for leaf, text in own_betas.items() if text]
    return [group for group in groups if group["params"]]


def build_muon(params: list[nn.Parameter], hp: Hyperparameters, dist_info: Dist) -> "Muon":
    """The run's Muon over `params`, every setting from hp (build_optimizers' Muon)."""
    return Muon(params, lr=hp.muon_lr, momentum=hp.muon_momentum, nesterov=hp.muon_nesterov,
                ns_steps=hp.muon_ns_steps, weight_decay=hp.muon_wd, rank=dist_info.rank,
                world_size=dist_info.world_size, polar_express=hp.muon_polar_express, eq_r=hp.muon_eq_r,
                normuon_beta2=hp.normuon_beta2 if hp.normuon else 0.0, cautious_wd=hp.cautious_wd,
                process_group=dist_info.group,
                compiled=hp.muon_compile == "on" or (hp.muon_compile == "auto" and dist_info.device.type == "cuda"),
                gram=hp.muon_gram, wd_scaled=hp.muon_wd_scaled, gather_bf16=hp.muon_gather_bf16, bf16=hp.muon_bf16)


def build_optimizers(model: GPT, hp: Hyperparameters, dist_info: Dist) -> list[torch.optim.Optimizer]:
    """Muon for every 2-D matrix inside the blocks (and the MTP projection); AdamW for the embedding, the lm_head and
    anything 0-D or 1-D or made by scalar_parameter (gates, lambdas, head-mixing matrices)."""
    named = dict(model.named_parameters())
    is_scalar = {name: (p.ndim < 2 or getattr(p, "scalar_group", False)) and not gate_in_muon(name, hp)
                 for name, p in named.items()}
    muon_params = [p for name, p in named.items() if name.split(".")[0] in ("blocks", "mtp_proj", "mtp_block")
                   and p.ndim == 2 and not is_scalar[name]]
    # the baseline record's value-embedding tables train with wte (its own AdamW group at the same LR, betas and WD)
    embed_params = [model.wte.weight] + [p for name, p in named.items() if name.startswith("value_embeds.")]
    head_params = [model.lm_head.weight]
    head_mix_params = head_mix_group(named, hp)
    own_group = {id(p) for p in head_mix_params}
    scalar_params = [p for name, p in named.items() if is_scalar[name] and id(p) not in own_group]
    assigned = {id(p) for p in muon_params + embed_params + head_params + scalar_params + head_mix_params}
    missing = [name for name, p in named.items() if id(p) not in assigned]
    if missing:  # a new parameter must be given an optimizer on purpose, never silently left untrained
        raise ConfigError(f"parameters with no optimizer: {', '.join(missing)}")
    adam_groups = [dict(params=embed_params, lr=hp.embed_lr, weight_decay=hp.adam_wd),
                   dict(params=head_params, lr=hp.head_lr, weight_decay=hp.adam_wd)]
    adam_groups += scalar_adam_groups({name: p for name, p in named.items()
                                       if is_scalar[name] and id(p) not in own_group}, hp)
    if head_mix_params:
        adam_groups.append(dict(params=head_mix_params, lr=hp.head_mix_lr, weight_decay=0.0))
    adamw = torch.optim.AdamW(adam_groups, betas=(hp.adam_beta1, hp.adam_beta2), eps=hp.adam_eps)
    muon = build_muon(muon_params, hp, dist_info)
    if hp.muon_gram == "triton" and not fused_loss_available(dist_info.device):
        raise ConfigError(f"--muon_gram triton needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); "
                          f"device {dist_info.device.type}, triton "
                          f"{'present' if importlib.util.find_spec('triton') else 'missing'}")
    optimizers = [adamw, muon]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
            group["initial_weight_decay"] = group["weight_decay"]
    return optimizers


def gate_in_muon(name: str, hp: Hyperparameters) -> bool:
    """Whether a gate trains with Muon (and its weight decay) instead of AdamW: gates_muon, both kinds (the 1h
    record); value_gate_muon, the value gates only (the baseline and 15min records: their ve_gate is a matrix inside
    transformer.h, which all goes to Muon, while 15min's attention gate has its own AdamW group)."""
    return (hp.gates_muon and scalar_role(name) == "gate") or (hp.value_gate_muon and name.endswith(".value_gate"))


def head_mix_group(named: dict, hp: Hyperparameters) -> list[nn.Parameter]:
    """With head_mix_lr > 0, the head-mixing matrices (trunk and MTP block) train in their own AdamW group at that
    LR, WD 0: the 1h record's IHA group (lr 0.02, not multiplied by its 0.25 LR multiplier; train.py --iha-lr)."""
    return [p for name, p in named.items() if hp.head_mix_lr > 0 and name.endswith("attn.head_mix")]


def average_gradients(model: nn.Module, dist_info: Dist) -> None:
    """Sums gradients over ranks. The loss is already divided by the global target count, so the sum is the mean."""
    if dist_info.world_size == 1:
        return
    handles = [dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=dist_info.group, async_op=True)
               for p in model.parameters() if p.grad is not None]
    for handle in handles:
        handle.wait()


class GradientSync:
    """The sum of the gradients over ranks, started during the backward (grad_sync overlap/overlap_flat) instead of
    after it: at the full shape the 7.15 GB fp32 all-reduce otherwise waits for the whole backward.
    Each parameter's post-accumulate-grad hook fires once its gradient is final; on the step's last micro-step that
    launches an asynchronous all-reduce (overlap: of that gradient itself, the very collective average_gradients
    issues, so the update is the same bit for bit; overlap_flat: of a flattened bucket once all its gradients are in,
    DDP-style). wait() finishes them before clipping and the optimizer step. Every rank runs the same graph, so the
    hooks fire, and the collectives are issued, in the same order everywhere. Under torch.compile the compiled
    backward hands over all gradients at its end, so the overlap shrinks to the gradient accumulation itself."""

    def __init__(self, hp: Hyperparameters, model: nn.Module, dist_info: Dist):
        self.model, self.dist_info, self.armed, self.launched = model, dist_info, False, set()
        self.mode = hp.grad_sync if dist_info.world_size > 1 else "after"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pending, self.hooks = [], []  # (handle, bucket index or None, flat tensor or param)
        self.buckets, self.bucket_of, self.filled = [], {}, []
        if self.mode == "overlap_flat":  # backward makes the last layers' gradients first: buckets in reverse order
            limit, current, size = hp.grad_bucket_mb * 2**20, [], 0
            for p in reversed(self.params):
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= limit:
                    self.buckets.append(current)
                    current, size = [], 0
            self.buckets += [current] if current else []
            self.bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        if self.mode != "after":
            self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def arm(self, last_micro_step: bool) -> None:
        """Called before each micro-step's backward: only the last one's gradients are complete sums to send."""
        self.armed = last_micro_step and self.mode != "after"
        self.filled = [0] * len(self.buckets)
        self.launched = set()

    def _launch(self, tensor: torch.Tensor, key) -> None:
        handle = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dist_info.group, async_op=True)
        self.pending.append((handle, key, tensor))
        self.launched.add(key)

    def _ready(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        if self.mode == "overlap":
            self._launch(param.grad, id(param))
            return
        index = self.bucket_of[id(param)]
        self.filled[index] += 1
        if self.filled[index] == len(self.buckets[index]):
            self._launch(torch.cat([p.grad.reshape(-1) for p in self.buckets[index]]), index)

    def wait(self) -> None:
        """Every gradient summed over the ranks when this returns (as average_gradients leaves them)."""
        if self.mode == "after":
            average_gradients(self.model, self.dist_info)
            return
        # a gradient whose hook did not fire on the last micro-step (none in this model): sent now, in parameter order
        if self.mode == "overlap":
            for p in self.params:
                if p.grad is not None and id(p) not in self.launched:
                    self._launch(p.grad, id(p))
        else:
            for index, bucket in enumerate(self.buckets):
                present = [p for p in bucket if p.grad is not None]
                if index in self.launched:
                    continue
                if len(present) == len(bucket):
                    self._launch(torch.cat([p.grad.reshape(-1) for p in bucket]), index)
                else:  # a bucket with gradient-less parameters: its gradients one by one, in place
                    for p in present:
                        self._launch(p.grad, None)
        for handle, key, tensor in self.pending:
            handle.wait()
            if self.mode == "overlap_flat" and key is not None:  # back from the flat bucket into each gradient
                offset = 0
                for p in self.buckets[key]:
                    p.grad.copy_(tensor[offset:offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
        self.pending, self.armed = [], False

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def snapshot_cycle_ends(total_steps: int, cycles: int) -> list[int]:
    """The step counts after which each snapshot cycle ends (the last is total_steps): whole steps, shared by the LR
    schedule and the snapshot taking, so every snapshot is taken after a step at the cycle's floor."""
    return [round((c + 1) * total_steps / cycles) for c in range(cycles)]


def snapshot_cycle_bounds(hp: Hyperparameters, total_steps: int, train_data: "TrainData | None" = None) -> list[int]:
    """The snapshot cycles' end steps. With snapshot_cycle_epochs (snapshot_cycles divides num_epochs and the run is
    all its epochs) each cycle ends at an epoch end: the unlimited record's 2-epoch cycles, so a batch_schedule
    changes the batch only between cycles. Without a batch_schedule these are exactly snapshot_cycle_ends."""
    cycles = hp.snapshot_cycles
    if not hp.snapshot_cycle_epochs or train_data is None or not cycles or hp.num_epochs % cycles:
        return snapshot_cycle_ends(total_steps, cycles)
    if train_data.segments and train_data.segments[0][1] is not None:  # public stepping by cycles: their ends
        ends = [first + steps for first, steps, _, _ in train_data.segments]
        return ends if ends[-1] == total_steps else snapshot_cycle_ends(total_steps, cycles)
    ends, done, per_cycle = [], 0, hp.num_epochs // cycles
    for epoch in range(hp.num_epochs):
        done += train_data.steps_in(epoch)
        if (epoch + 1) % per_cycle == 0:
            ends.append(done)
    return ends if done == total_steps else snapshot_cycle_ends(total_steps, cycles)


def snapshot_cycle_factor(step: int, ends: list[int], hp: Hyperparameters) -> float:
    """The LR factor of a step in the snapshot cycles ending at `ends`: cosine, 1 down to lr_cycle_floor on the
    cycle's last step (the snapshot's weights); linear, the unlimited record's floor + (1 - floor)(1 - i/n) at step
    i = 0..n-1 of an n-step cycle (its last step at floor + (1 - floor)/n)."""
    cycle = bisect.bisect_right(ends, step)  # the cycle this step is in: its end is the first end after it
    start = ends[cycle - 1] if cycle else 0
    if hp.snapshot_cycle_shape == "linear":
        return hp.lr_cycle_floor + (1.0 - hp.lr_cycle_floor) * (1.0 - (step - start) / (ends[cycle] - start))
    phase = (step + 1 - start) / (ends[cycle] - start)  # 1 on the cycle's last step: the snapshot's weights
    return cosine_to_floor(phase, hp.lr_cycle_floor)


def cosine_to_floor(phase: float, floor: float) -> float:
    """The LR shape of a cycle: 1 at phase 0, down half a cosine to `floor` at phase 1 (SGDR, Loshchilov & Hutter
    2017; snapshot ensembles; SWA's cycles)."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * phase))


def lr_multiplier(step: int, total_steps: int, hp: Hyperparameters, train_data: "TrainData | None" = None) -> float:
    """The LR factor of a step: linear warmup; then snapshot cycles if on (ending at epoch ends when train_data
    says where, snapshot_cycle_bounds); else constant (or lr_cycles cosine cycles) followed by the warmdown over the
    final warmdown_frac to final_lr_frac (linear, or warmdown_shape)."""
    if step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    progress = step / total_steps
    warmdown_start = 1.0 - hp.warmdown_frac
    if hp.snapshot_cycles:  # snapshot ensembles: C cycles over the whole run, each ending at lr_cycle_floor
        return snapshot_cycle_factor(step, snapshot_cycle_bounds(hp, total_steps, train_data), hp)
    if hp.public_steps and hp.warmdown_frac and not hp.lr_cycles:  # the public's warmdown: round(frac x N) steps
        warmdown = round(hp.warmdown_frac * total_steps)  # 1h: 419 of N = 2,097 (0.2 N = 419.4)
        if step <= total_steps - warmdown:
            return 1.0
        shaped = ((total_steps - step) / warmdown) ** hp.warmdown_shape
        return shaped + (1.0 - shaped) * hp.final_lr_frac
    if progress < warmdown_start or hp.warmdown_frac == 0:
        if hp.lr_cycles:  # cosine cycles from 1 down to lr_cycle_floor, restarting (SGDR)
            phase = (progress / max(warmdown_start, 1e-12) * hp.lr_cycles) % 1.0
            return cosine_to_floor(phase, hp.lr_cycle_floor)
        return 1.0
    if hp.warmdown_shape != 1.0:  # shape > 1 keeps the LR high longer, < 1 drops it early
        decayed = (progress - warmdown_start) / hp.warmdown_frac
        return hp.final_lr_frac + (1.0 - hp.final_lr_frac) * (1.0 - decayed) ** hp.warmdown_shape
    return 1.0 - (progress - warmdown_start) / hp.warmdown_frac * (1.0 - hp.final_lr_frac)


def final_epoch_cosine(step: int, total_steps: int, factor: float, hp: Hyperparameters) -> float:
    """The 1h record's final-epoch cosines ("SWA cycles", records #12/#13): over the last lr_epoch_cosine epochs of
    spe = total_steps / num_epochs steps each, the LR factor falls within every epoch by half a cosine from
    max(factor, floor) to the floor, so each epoch ends at a low-LR point whose checkpoint the averages use. The
    public script's arithmetic: a fractional epoch length, and off when the cosines would start before step 0."""
    floor, steps_per_epoch = hp.lr_epoch_cosine_floor, total_steps / hp.num_epochs
    start = total_steps - hp.lr_epoch_cosine * steps_per_epoch
    if start < 0 or step < start:
        return factor
    position = (step - start) % steps_per_epoch
    return floor + (max(factor, floor) - floor) * (1 + math.cos(math.pi * position / steps_per_epoch)) / 2


def slowrun_wd_multiplier(epoch_position: float, total_epochs: float, hp: Hyperparameters) -> float:
    """The 1h record's weight-decay schedule (#20): 1 until wd_hold_frac of training, linearly down to wd_low where
    the lr_epoch_cosine epochs start, then wd_low -> wd_high linearly within each of those epochs: the decay rises
    while the LR cosine falls (anti-phase). Epoch positions are the public's step / (total_steps / num_epochs)."""
    cosine_start = total_epochs - hp.lr_epoch_cosine if hp.lr_epoch_cosine else -1.0
    if cosine_start >= 0 and epoch_position >= cosine_start:
        return hp.wd_low + (hp.wd_high - hp.wd_low) * ((epoch_position - cosine_start) % 1.0)
    progress = epoch_position / total_epochs
    if progress < hp.wd_hold_frac:
        return 1.0
    decay_end = cosine_start / total_epochs if cosine_start > 0 else 1.0
    decayed = min(max((progress - hp.wd_hold_frac) / max(decay_end - hp.wd_hold_frac, 1e-6), 0.0), 1.0)
    return 1.0 - (1.0 - hp.wd_low) * decayed


def wd_multiplier(epoch_position: float, total_epochs: float, lr_factor: float, hp: Hyperparameters) -> float:
    """Weight-decay schedule, multiplying the groups' weight decay (the step's shrink is lr * wd):
    flat 1; inverse 1 / max(lr multiplier, 0.1), holding lr * wd at its peak through the warmdown; sawtooth over the
    final wd_sawtooth_epochs epochs, falling 2 -> 0 within each epoch (mean 1), 1 before them; slowrun: the 1h
    record's (slowrun_wd_multiplier)."""
    if hp.wd_schedule == "slowrun":
        return slowrun_wd_multiplier(epoch_position, total_epochs, hp)
    if hp.wd_schedule == "cycle_inverse":  # the unlimited record: 0.7 at a cycle's LR peak -> 1 at its floor
        return hp.wd_floor + (1.0 - hp.wd_floor) * (1.0 - lr_factor) / (1.0 - hp.lr_cycle_floor)
    if hp.wd_schedule == "inverse":
        return 1.0 / max(lr_factor, 0.1)
    if hp.wd_schedule == "sawtooth":
        if epoch_position >= total_epochs - hp.wd_sawtooth_epochs:
            return 2.0 * (1.0 - epoch_position % 1.0)
    return 1.0


def points_wd_multiplier(step: int, total_steps: int, hp: Hyperparameters) -> float:
    """The 15min record's weight-decay schedule (#7): piecewise linear in steps through the wd_points knots, the knot
    of epoch e at step round(e / num_epochs x total_steps), held beyond the ends (numpy.interp; tiny/train.py 1275-1276,
    1433-1443: 0.8 held to epoch 2, down to 0.1 at epoch 8, up to 0.93 at the end, i.e. multipliers of 0.8)."""
    knots = wd_point_knots(hp)
    steps = [round(epoch / hp.num_epochs * total_steps) for epoch, _ in knots]
    return float(np.interp(step, steps, [multiplier for _, multiplier in knots]))


def muon_momentum(step: int, hp: Hyperparameters) -> float:
    """Muon momentum warmup: linear 0.85 -> muon_momentum over muon_momentum_warmup steps (modded-nanogpt)."""
    return 0.85 + (hp.muon_momentum - 0.85) * min(1.0, step / hp.muon_momentum_warmup)


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, train_data: TrainData,
                    hp: Hyperparameters) -> float:
    """Sets this step's LR (and, when their flags are on, weight decay and Muon momentum); returns the LR factor."""
    factor = lr_multiplier(step, total_steps, hp, train_data)
    if hp.lr_epoch_cosine:
        factor = final_epoch_cosine(step, total_steps, factor, hp)
    epoch_position, total_epochs = train_data.epoch_position(step), train_data.epoch_position(total_steps)
    if hp.swa_epochs and epoch_position >= total_epochs - hp.swa_epochs:  # SWA: one cosine cycle per final epoch
        epoch, step_in_epoch = train_data.locate(step)
        phase = (step_in_epoch + 1) / train_data.steps_in(epoch)  # the epoch's last step at the floor
        factor = cosine_to_floor(phase, hp.lr_cycle_floor)
    wd_factor = wd_multiplier(epoch_position, total_epochs, factor, hp) if hp.wd_schedule != "flat" else None
    if hp.wd_schedule == "points":
        wd_factor = points_wd_multiplier(step, total_steps, hp)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
            if wd_factor is not None:
                group["weight_decay"] = group["initial_weight_decay"] * wd_factor
            if hp.muon_momentum_warmup and isinstance(optimizer, Muon):
                group["momentum"] = muon_momentum(step, hp)
    return factor


# ----------------------------------------------------------------------------------------------------------------------
# Losses and evaluation: distillation from a teacher, ensembles of members


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss in nats; targets of -1 are ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="sum")


def autocast_context(device: torch.device):
    """bf16 autocast on GPU (parameters stay float32 master copies); plain float32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def teacher_log_probs(teachers: list[tuple[nn.Module, float]], features: list[torch.Tensor], start: int, end: int,
                      temperature: float) -> torch.Tensor:
    """log of the teachers' weighted average of softmax(logits / T) at positions [start, end): (B, end-start, V).
    Only this chunk of each teacher's logits exists in float32 at a time (the teachers are an ensemble's members)."""
    chunk_logits = (teacher.head(feature[:, start:end]) / temperature
                    for (teacher, _), feature in zip(teachers, features))
    return ensemble_log_probs(chunk_logits, [weight for _, weight in teachers], "prob")


def distillation_loss_sum(student_logits: torch.Tensor, teachers: list[tuple[nn.Module, float]],
                          teacher_features: list[torch.Tensor], targets: torch.Tensor, alpha: float,
                          temperature: float, chunk: int) -> torch.Tensor:
    """Summed (1 - alpha) CE(targets) + alpha T^2 KL(teacher || student at temperature T) over the valid targets
    (Hinton et al. 2015: T^2 keeps the soft-target gradients on the scale of the hard ones), for the eager path's
    (already soft-capped) logits: the one objective, fused_loss_sums, on its chunked PyTorch backend. The teachers'
    logits are made `chunk` positions of every sequence at a time from their final features, never as one float32
    batch x vocab tensor."""
    rows = teacher_rows(teachers, teacher_features, temperature)
    return fused_loss_sums(student_logits, targets, 0.0, "chunked", rows, alpha, temperature,
                           chunk * student_logits.size(0))[0]


def ensemble_log_probs(logits_of_members, weights: list[float], mode: str) -> torch.Tensor:
    """Combines members' logits (B, T, V), a list or a generator (then one member's logits exist at a time), into the
    ensemble's log-probabilities. "prob": log sum_i w_i softmax(l_i), the probability averaging of the slowrun
    records; "logit": log_softmax(sum_i w_i l_i) (a normalised geometric mean)."""
    if mode == "logit":
        return F.log_softmax(sum(w * logits for w, logits in zip(weights, logits_of_members)), dim=-1)
    mixture = None
    for weight, logits in zip(weights, logits_of_members):
        log_probs = F.log_softmax(logits.float(), dim=-1) + math.log(weight)
        mixture = log_probs if mixture is None else torch.logaddexp(mixture, log_probs)
    return mixture


EVAL_CPU_POSITIONS = 512  # positions per evaluation forward on CPU: each (positions, 50,304) float32 tensor is 100 MB


def eval_pieces(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device):
    """An evaluation batch moved to the device, on CPU in pieces of whole sequences of at most EVAL_CPU_POSITIONS
    positions: the softcap and log-softmax each make a float32 (positions, vocab) tensor, 400 MB apiece for the tiny
    preset's 8 x 256 batch, and peak memory is what a laptop runs out of. Sums over pieces are the batch's sums (the
    order of float additions aside). On GPU the batch goes whole (throughput)."""
    rows = inputs.size(0) if device.type != "cpu" else max(1, EVAL_CPU_POSITIONS // max(1, inputs.size(1)))
    for first in range(0, inputs.size(0), rows):
        yield inputs[first:first + rows].to(device), targets[first:first + rows].to(device)


def release_free_memory(device: torch.device) -> None:
    """Hands memory that glibc keeps after frees back to the OS (malloc_trim): tune_cpu_runtime lets the heap keep
    freed blocks for the next training step's same-sized tensors; after an evaluation, whose tensors have other
    sizes, keeping them only adds to the resident set. No-op off glibc or on GPU."""
    if device.type != "cpu":
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


EVAL_CPU_LOSS_ROWS = 64  # positions per log-softmax in target_log_probs: each (64, 50,304) float32 tensor is 13 MB


def target_log_probs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(positions,) float32: the model's log-probability of each target (targets of -1: of token 0), from its raw
    lm_head output capped and normalised EVAL_CPU_LOSS_ROWS positions at a time with GPT.head's and the eager
    evaluation's operations, so every value is bitwise the one picked from the whole (positions, vocab) tensor."""
    raw = model(inputs, raw_logits=True)
    raw, targets = raw.reshape(-1, raw.size(-1)), targets.reshape(-1)
    softcap, picked = model.logit_softcap, torch.empty(raw.size(0), dtype=torch.float32, device=raw.device)
    for start in range(0, raw.size(0), EVAL_CPU_LOSS_ROWS):
        chunk = slice(start, start + EVAL_CPU_LOSS_ROWS)
        logits = soft_cap(raw[chunk].float(), softcap)
        chosen = targets[chunk].clamp(min=0).unsqueeze(-1)
        picked[chunk] = F.log_softmax(logits.float(), dim=-1).gather(-1, chosen)[:, 0]
    return picked


def piece_target_log_probs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                           device: torch.device) -> torch.Tensor:
    """(B, T, 1): the model's log-probability of each target of a piece; on CPU by target_log_probs (bitwise the
    same values without the (positions, vocab) tensors: every piece's freed 100 MB blocks, split by the small
    tensors kept between pieces, had grown an 8 x 256 x 32k-target evaluation past 5 GB resident)."""
    if device.type == "cpu":
        return target_log_probs(model, inputs, targets).reshape(*targets.shape, 1)
    return whole_target_log_probs(model, inputs, targets, device)


def whole_target_log_probs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                           device: torch.device) -> torch.Tensor:
    """(B, T, 1): the model's log-probability of each target, picked from its whole (B, T, vocab) log-softmax (any
    model that returns logits; piece_target_log_probs' path on a GPU)."""
    with autocast_context(device):
        logits = model(inputs).float()
    return F.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))


@torch.no_grad()
def score(models: list[nn.Module], weights: list[float], data: EvalData, dist_info: Dist, batch_size: int,
          mode: str = "prob", token_bytes: np.ndarray | None = None) -> tuple[float, float]:
    """(mean loss in nats per target, bits per byte) of the models' ensemble over the whole set; one model is
    score([model], [1.0], ...). The one scoring function: live models and parked frozen ones alike (a frozen model
    comes to the device only while it is scored, one at a time: the 24 candidates of an 8-member ensemble at the 1h
    shape do not fit together). Each rank scores its share of the windows; float64 sums over ranks.
    "prob" (the public records' ensembles) mixes only each model's log-probability of the correct token, per target,
    log sum_i w_i p_i(y), with ensemble_log_probs' elementwise operations; "logit" averages whole logits, so every
    model comes to the device at once (logit_average_loss).
    Bits per byte as the public records' evaluate_bpb score them: the nats of the targets that have bytes / (ln 2 x
    their bytes), <|endoftext|> counting 0 bytes (token_bytes: the UTF-8 bytes of each token id); nan without
    token_bytes. Without it, on the CPU each model's log-probabilities come in pieces (eval_pieces, target_log_probs)
    with no (positions, vocab) tensor kept: bitwise the same values, in a laptop's memory."""
    device = dist_info.device
    require(mode in ("prob", "logit"), f"unknown ensemble mode {mode!r}: prob | logit")
    if mode == "logit":
        with frozen_models_on_device(models, dist_info):
            return logit_average_loss(models, weights, data, dist_info, batch_size), float("nan")
    batches = list(data.batches(dist_info.rank, dist_info.world_size, batch_size))
    if token_bytes is None:
        def pieces():  # the same pieces in the same order for every model (eval_pieces: CPU memory)
            return (piece for batch in batches for piece in eval_pieces(*batch, device))
        mixture = frozen_mixture(models, weights, pieces, dist_info)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, target count]
        for (_, targets), picked in zip(pieces(), mixture):
            targets = targets.reshape(-1)
            totals[0] += F.nll_loss(picked.reshape(-1, 1), torch.where(targets >= 0, 0, -1), ignore_index=-1,
                                    reduction="sum").double()
            totals[1] += (targets >= 0).sum()
        dist_info.all_reduce_sum(totals)
        release_free_memory(device)
        return (totals[0] / totals[1]).item(), float("nan")
    batches = [(inputs.to(device), targets.to(device)) for inputs, targets in batches]
    mixture = frozen_mixture(models, weights, lambda: batches, dist_info, whole_target_log_probs)
    table = torch.as_tensor(token_bytes, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, targets, nats with bytes, bytes
    for (_, targets), picked in zip(batches, mixture):
        valid = targets >= 0
        nats, counted = -picked.squeeze(-1).double() * valid, table[targets.clamp(min=0)] * valid
        sums += torch.stack([nats.sum(), valid.sum().double(), (nats * (counted > 0)).sum(), counted.sum().double()])
    dist_info.all_reduce_sum(sums)
    release_free_memory(device)
    return (sums[0] / sums[1]).item(), (sums[2] / (math.log(2) * sums[3])).item()


def logit_average_loss(models: list[nn.Module], weights: list[float], data: EvalData, dist_info: Dist,
                       batch_size: int) -> float:
    """score's "logit" mode: the mean loss of log_softmax(sum_i w_i l_i), every model on the device."""
    states = [model.training for model in models]
    for model in models:
        model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist_info.device)  # [loss sum, target count]
    for batch in data.batches(dist_info.rank, dist_info.world_size, batch_size):
        for inputs, targets in eval_pieces(*batch, dist_info.device):
            with autocast_context(dist_info.device):
                log_probs = ensemble_log_probs([model(inputs).float() for model in models], weights, "logit")
            totals[0] += F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), targets.reshape(-1), ignore_index=-1,
                                    reduction="sum").double()
            totals[1] += (targets >= 0).sum()
            del log_probs
    dist_info.all_reduce_sum(totals)
    for model, state in zip(models, states):
        model.train(state)
    release_free_memory(dist_info.device)
    return (totals[0] / totals[1]).item()


def snapshot_mixtures(hp: Hyperparameters, count: int) -> dict[str, list[float]]:
    """The epoch snapshots' mixture weights by epoch_snapshot_weights, candidates oldest first: equal 1/n and recency
    i / sum(1..n) (the 1h record's "equal" and "weighted" logit-avg modes; "both" scores both)."""
    mixtures = dict(equal=[1.0 / count] * count, recency=[i / (count * (count + 1) / 2) for i in range(1, count + 1)])
    return mixtures if hp.epoch_snapshot_weights == "both" else {hp.epoch_snapshot_weights: mixtures[hp.epoch_snapshot_weights]}


def public_figure_rows(hp: Hyperparameters, dist_info: Dist, data: "RunData", epoch_rows: list[dict],
                       averages: dict[str, tuple[list, list[float]]], scored: list[dict] = ()) -> dict:
    """The figure the public leaderboard reports ("Min val Loss", 1h train.py): the epoch-end evaluation with the
    lowest bits per byte (its loss), replaced by an average (probability averaging of checkpoints or the ensemble)
    scored on the same windows whenever that average's loss is lower. Epoch rows with full_depth False (fewer
    recurrent passes than the model's full count) are listed but never chosen (15min: tiny/train.py 1519). scored:
    candidates already scored (the 15min record's EMA and checkpoint average, score_weight_candidates), taken in
    order before the averages, each replacing the best when its val_bpb (rule "bpb": the EMA, tiny/train.py
    1562-1564) or its val_loss (rule "loss": the checkpoint average, 1591-1592) is lower."""
    rows = [dict(row, label=f"epoch end, step {row['step']}") for row in epoch_rows]
    best = min((row for row in rows if row.get("full_depth", True)),
               key=lambda row: row["val_bpb"] if row["val_bpb"] == row["val_bpb"] else row["val_loss"], default=None)
    for row in scored:
        rows.append(dict(row))
        key = "val_bpb" if row["rule"] == "bpb" and row["val_bpb"] == row["val_bpb"] else "val_loss"
        if best is None or row[key] < best[key]:
            best = rows[-1]
    for label, (models, weights) in averages.items():
        loss, bpb = score(models, weights, data.public_data, dist_info, hp.val_batch_size,
                          token_bytes=data.token_bytes)
        rows.append(dict(label=label, val_loss=loss, val_bpb=bpb))
        if best is None or loss < best["val_loss"]:
            best = rows[-1]
    return dict(val_loss_public=best["val_loss"], val_bpb_public=best["val_bpb"], chosen=best["label"],
                evaluations=rows, windows=data.public_data.num_windows)


@torch.no_grad()
def target_probabilities(models: list[nn.Module], data: EvalData, dist_info: Dist, batch_size: int) -> torch.Tensor:
    """(candidates, targets) float64: each candidate's probability of every correct next token of the set. The
    candidates are spread over the ranks (rank r scores r, r + world, ...) and the rows summed over ranks."""
    rows = []
    for index, model in enumerate(models):
        if index % dist_info.world_size != dist_info.rank:
            if hasattr(model, "frozen_shards") or hasattr(model, "candidate_file"):  # split over the ranks or on
                # disk: the others take part in its owner's gather, or in the broadcast from the rank with the file
                with frozen_on_device(model, dist_info):
                    pass
            rows.append(None)
            continue
        was_training = model.training
        model.eval()
        probs = []
        with frozen_on_device(model, dist_info):  # a parked candidate comes to the device for its rows, then back
            for batch in data.batches(0, 1, batch_size):
                for inputs, targets in eval_pieces(*batch, dist_info.device):
                    picked = piece_target_log_probs(model, inputs, targets, dist_info.device).squeeze(-1)
                    probs.append(picked[targets >= 0].double().exp())
        model.train(was_training)
        rows.append(torch.cat(probs))
    table = torch.stack([row if row is not None else
                         torch.zeros(data.num_targets, dtype=torch.float64, device=dist_info.device) for row in rows])
    return dist_info.all_reduce_sum(table).cpu()


def learn_mixture_weights(probs: torch.Tensor, steps: int, lr: float = 0.05, clip: float = 0.0,
                          init_noise: float = 0.0) -> torch.Tensor:
    """Softmax mixture weights over candidates minimising -mean log sum_i w_i p_i(correct token): the weights of
    the best probability-averaged ensemble on this data. Convex in w; Adam on the softmax logits gets there. The
    unlimited record's gradient_select: logits from 1e-4 N(0, 1) (seed 0), lr 0.5, gradient norm clipped to 1."""
    logits = torch.zeros(probs.size(0), dtype=torch.float64, requires_grad=True)
    if init_noise:
        draw = torch.randn(probs.size(0), generator=torch.Generator().manual_seed(0))
        logits = (init_noise * draw).double().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -torch.log(torch.softmax(logits, 0) @ probs + 1e-300).mean()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_([logits], clip)
        optimizer.step()
    return torch.softmax(logits.detach(), 0)


def select_members(weights: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """(candidate index, renormalised weight) of the top candidates by weight (all when top is 0), best first."""
    order = torch.argsort(weights, descending=True).tolist()[:top or weights.numel()]
    total = float(weights[order].sum())
    return [(index, float(weights[index]) / total) for index in order]


def sweep_top_k(hp: Hyperparameters, learned: torch.Tensor, candidates: list, data: "RunData", dist_info: Dist,
                log: "RunLog") -> list[tuple[int, float]]:
    """select_top_sweep: the top-K ensemble by learned weight (renormalised) for each K, each scored on val and
    logged; returns the largest K's choice (the one the unlimited record's result.json keeps)."""
    for k in top_sweep(hp, len(candidates)):
        chosen = select_members(learned, k)
        loss = score([candidates[i] for i, _ in chosen], [w for _, w in chosen], data.val_data, dist_info,
                     hp.val_batch_size, hp.ensemble_mode)[0]
        log.write(f"selection sweep | top {k} of {len(candidates)} by learned weight | val_loss {loss:.4f}")
        log.metrics(dict(kind="selection_sweep", top=k, candidates=len(candidates), val_loss=loss))
    return chosen


def teacher_rows(teachers: list[tuple[nn.Module, float]], features: list[torch.Tensor], temperature: float):
    """For the fused loss: rows (start, end) of the flattened (B*T) positions -> the teachers' mixture log-probs
    (end - start, V), made on demand from their final features, as teacher_log_probs makes a chunk of positions."""
    flat = [feature.reshape(1, -1, feature.size(-1)) for feature in features]  # (1, B*T, C)
    return lambda start, end: teacher_log_probs(teachers, flat, start, end, temperature)[0]


def training_loss_sums(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mtp_weight: float,
                       distill=None, fused: tuple[str, float] | None = None,
                       mtp_style: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, summed objective to minimise). The objective is the next-token loss, or with a
    teacher `distill(logits)` (the distillation mix), plus mtp_weight times the summed loss of predicting token
    t+2 (targets shifted by one) when multi-token prediction is on. The logged train loss is always plain CE.
    fused = (backend, softcap) takes the fused loss path (Kernels) from the raw lm_head output; distill is then
    fused_loss_sums' teacher keywords (teacher_rows, alpha, temperature, chunk_rows) or None."""
    block = mtp_style == "block" and mtp_weight > 0  # the MTP block reads the targets (next-token embeddings)
    if fused is not None:
        backend, softcap = fused
        output = model(inputs, raw_logits=True, **(dict(targets=targets) if block else {}))
        raw, mtp_raw = output if isinstance(output, tuple) else (output, None)
        objective, loss = fused_loss_sums(raw, targets, softcap, backend, **(distill or {}))
        if block:
            mtp_sum = fused_loss_sums(mtp_raw, targets[:, 1:], softcap, backend)[0]
            return loss, objective + mtp_weight * block_mtp_scale(targets) * mtp_sum
        if mtp_raw is not None and mtp_weight > 0:  # token t+2: targets shifted by one, the last position has none
            later = F.pad(targets[:, 1:], (0, 1), value=-1)
            objective = objective + mtp_weight * fused_loss_sums(mtp_raw, later, softcap, backend)[0]
        return loss, objective
    output = model(inputs, **(dict(targets=targets) if block else {}))
    logits, mtp_logits = output if isinstance(output, tuple) else (output, None)
    loss = cross_entropy_sum(logits, targets)
    objective = distill(logits) if distill is not None else loss
    if block:
        return loss, objective + mtp_weight * block_mtp_scale(targets) * cross_entropy_sum(mtp_logits, targets[:, 1:])
    if mtp_logits is not None and mtp_weight > 0:
        objective = objective + mtp_weight * cross_entropy_sum(mtp_logits[:, :-1], targets[:, 1:])
    return loss, objective


def chunked_loss_sums(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, softcap: float,
                      rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """training_loss_sums' plain case (next-token CE is the objective) with the loss in chunks of rows positions
    (ChunkedSoftcapCE, CPU memory): (summed loss, the same tensor as the objective), bitwise the eager pair."""
    raw = model(inputs, raw_logits=True)
    loss = ChunkedSoftcapCE.apply(raw.reshape(-1, raw.size(-1)), targets.reshape(-1), softcap, rows)
    return loss, loss


def block_mtp_scale(targets: torch.Tensor) -> torch.Tensor:
    """The 1h record adds the MTP loss as a mean over its own valid targets (T - 1 per row) to the next-token mean:
    our losses are sums over the micro-batch's next-token targets, so the MTP sum is scaled by their ratio."""
    return (targets >= 0).sum() / (targets[:, 1:] >= 0).sum().clamp(min=1)


# The 15min record's multi-token loss (tiny/train.py get_mtp_weights, GPT._mtp_loss; tiny/cuda_kernels.py
# ce_fwd_bwd_kernel, records/TRACKS.md F14f): one lm_head, its soft-capped logits at row r of the flattened micro-batch
# scored against the targets of rows r, r + 1, r + 2 (across sequence ends, as the public kernel reads them), the
# extra offsets fading to zero by mtp_anneal_frac of training (records #13: -0.009 with XSA on every layer).

FP8_X_SCALE, FP8_W_SCALE, FP8_GRAD_SCALE = 100 / 448, 1.6 / 448, 0.75 / 448  # tiny/train.py 187-189


def mtp_offset_weights(step: int, total_steps: int, hp: Hyperparameters) -> list[float]:
    """The weights of the targets t, t+1, .. at a step: offset k >= 1 keeps its start weight until its slice
    [(n-1-k)/(n-1) A, (n-k)/(n-1) A] of training (A = mtp_anneal_frac, n offsets) begins, falls linearly to 0 over it
    and stays 0: the furthest offset goes first, training ends on next-token prediction (tiny/train.py 1303-1326)."""
    start = mtp_offset_start_weights(hp)
    count, fraction, anneal = len(start), min(1.0, step / max(1, total_steps)), hp.mtp_anneal_frac
    weights = start[:1]
    for k in range(1, count):
        low, high = (count - 1 - k) / (count - 1) * anneal, (count - k) / (count - 1) * anneal
        fade = 1.0 if fraction <= low else 0.0 if fraction >= high else 1.0 - (fraction - low) / (high - low)
        weights.append(start[k] * fade)
    return weights


def multi_offset_rows(logits: torch.Tensor, shifted: torch.Tensor, weights: tuple[float, ...],
                      softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (n, V) of raw logits and their targets at each offset (offsets, n) (-1: none) -> float32 (objective per
    row = sum_k w_k (lse - z[y_k]) over the offsets with a target, next-token CE per row, d objective / d logits),
    z = softcap tanh(logits / softcap) over every column; the gradient written out by hand."""
    z = soft_cap(logits.float(), softcap)
    log_p = F.log_softmax(z, dim=-1)
    probabilities = log_p.exp()
    objective, grad, ce = torch.zeros_like(z[:, 0]), torch.zeros_like(z), None
    for offset, weight in enumerate(weights):
        valid = shifted[offset] >= 0
        safe = shifted[offset].clamp(min=0).unsqueeze(-1)
        nll = -log_p.gather(-1, safe).squeeze(-1) * valid
        ce = nll if ce is None else ce
        if weight == 0:
            continue
        objective += weight * nll
        scale = (weight * valid).unsqueeze(-1).float()
        grad += scale * probabilities
        grad.scatter_add_(-1, safe, -scale)
    if softcap > 0:
        grad *= 1 - (z / softcap).square()
    return objective, ce, grad


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: float, scale_b: float, out_dtype: torch.dtype,
               fast_accum: bool) -> torch.Tensor:
    """(a scale_a) @ (b scale_b) of fp8 tensors: torch._scaled_mm on CUDA (a row-major, b column-major, as the 15min
    record calls it); elsewhere the same product of the dequantised values in float32 (a simulation: CPU tests)."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=a.new_tensor(scale_a, dtype=torch.float32),
                                scale_b=a.new_tensor(scale_b, dtype=torch.float32), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


class MultiOffsetLoss(torch.autograd.Function):
    """(summed multi-offset objective, summed next-token CE) of rows (N, V) of raw logits (weight None), or with
    weight (V, C) of features (N, C) whose logits are made by the fp8 matmul: x / FP8_X_SCALE and W / FP8_W_SCALE in
    e4m3, bf16 logits; the logit gradient then kept in e5m2 scaled by 1 / FP8_GRAD_SCALE and the input and weight
    gradients made by fp8 matmuls from it (tiny/cuda_kernels.py FusedSoftcappedCrossEntropy). The gradient is made
    in the forward, chunk_rows rows at a time (float32 only for those rows); backward scales it."""

    @staticmethod
    def forward(ctx, rows, weight, shifted, weights, softcap, chunk_rows):
        ctx.fp8 = weight is not None
        if ctx.fp8:
            x8 = (rows / FP8_X_SCALE).to(torch.float8_e4m3fn)
            w8 = (weight / FP8_W_SCALE).to(torch.float8_e4m3fn)
            logits = fp8_matmul(x8, w8.t(), FP8_X_SCALE, FP8_W_SCALE, torch.bfloat16, fast_accum=True)
            grad = torch.empty(logits.shape, dtype=torch.float8_e5m2, device=logits.device)
        else:
            logits = rows
            grad = torch.empty_like(logits)
        objective = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce = torch.zeros_like(objective)
        for start in range(0, logits.size(0), chunk_rows):
            end = min(start + chunk_rows, logits.size(0))
            chunk_objective, chunk_ce, chunk_grad = multi_offset_rows(logits[start:end], shifted[:, start:end],
                                                                      weights, softcap)
            grad[start:end] = chunk_grad / FP8_GRAD_SCALE if ctx.fp8 else chunk_grad
            objective += chunk_objective.sum()
            ce += chunk_ce.sum()
        ctx.save_for_backward(grad, *((x8, w8) if ctx.fp8 else ()))
        ctx.input_dtypes = (rows.dtype, weight.dtype if ctx.fp8 else None)
        ctx.mark_non_differentiable(ce)
        return objective, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_objective, grad_ce):
        if not ctx.fp8:
            (grad,) = ctx.saved_tensors
            return (grad.mul_(grad_objective.to(grad.dtype)),) + (None,) * 5
        grad, x8, w8 = ctx.saved_tensors
        grad_rows = fp8_matmul(grad, w8.t().contiguous().t(), FP8_GRAD_SCALE, FP8_W_SCALE, torch.bfloat16,
                               fast_accum=False)
        grad_weight = fp8_matmul(grad.t().contiguous(), x8.t().contiguous().t(), FP8_GRAD_SCALE, FP8_X_SCALE,
                                 torch.float32, fast_accum=False)
        return ((grad_rows * grad_objective).to(ctx.input_dtypes[0]),
                (grad_weight * grad_objective).to(ctx.input_dtypes[1])) + (None,) * 4


def multi_offset_loss_sums(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weights: list[float],
                           softcap: float, fp8: bool = False, chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, summed multi-offset objective) of one micro-batch: the targets of the flattened
    (B*T) rows shifted by each offset (the last rows have fewer; -1 targets count for nothing), divided by the step's
    target count like every objective here: the record's mean over rows. fp8: the fp8 lm_head matmul (CUDA)."""
    flat = targets.reshape(-1)
    shifted = torch.stack([F.pad(flat[offset:], (0, offset), value=-1) for offset in range(len(weights))])
    if fp8:  # the lm_head's input: the loss makes the logits itself
        features = model(inputs, raw_logits="features")
        objective, ce = MultiOffsetLoss.apply(features.reshape(-1, features.size(-1)), model.lm_head.weight,
                                              shifted, tuple(weights), softcap, chunk_rows)
    else:
        raw = model(inputs, raw_logits=True)
        objective, ce = MultiOffsetLoss.apply(raw.reshape(-1, raw.size(-1)), None, shifted, tuple(weights), softcap,
                                              chunk_rows)
    return ce, objective


def frozen_mixture(models: list[nn.Module], weights: list[float], pieces, dist_info: Dist,
                   log_probs=piece_target_log_probs) -> list[torch.Tensor]:
    """Per piece of pieces() (the same pieces in the same order on every call), the "prob" mixture's log-probability
    of each target, log sum_i w_i p_i(y) as (B, T, 1): the members brought to the device one at a time, each one's
    target log-probabilities (log_probs) mixed with ensemble_log_probs' elementwise operations."""
    mixture = []
    for model, weight in zip(models, weights):
        was_training = model.training
        with frozen_on_device(model.eval(), dist_info):
            for index, (inputs, targets) in enumerate(pieces()):
                picked = log_probs(model, inputs, targets, dist_info.device) + math.log(weight)
                if index == len(mixture):
                    mixture.append(picked)
                else:
                    mixture[index] = torch.logaddexp(mixture[index], picked)
        model.train(was_training)
    return mixture


# ----------------------------------------------------------------------------------------------------------------------
# Training one member: its schedule, objective, weight averages and snapshots, and the loop (train_member)


class WeightEMA:
    """Exponential moving average of the parameters (Polyak averaging; modded-nanogpt, the slowrun records):
    ema <- decay * ema + (1 - decay) * w at each update, starting from the weights it was made with."""

    def __init__(self, model: nn.Module, decay: float, host: torch.device | None = None):
        self.decay, self.host = decay, host  # host: the averages live in host memory (averaging_on_host)
        self.averages = [host_copy(p, host) for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.averages, [p.detach().to(a.device) for p, a in zip(model.parameters(),
                                                                                      self.averages)], 1.0 - self.decay)

    @torch.no_grad()
    def blend_into(self, model: nn.Module, blend: float) -> None:
        """The model's weights become blend * EMA + (1 - blend) * its current weights."""
        for param, average in zip(model.parameters(), self.averages):
            param.lerp_(average.to(param.device), blend)


def host_copy(tensor: torch.Tensor, host: torch.device | None) -> torch.Tensor:
    """A detached copy of a tensor: on its own device, or (host given) in host memory, pinned when it comes from CUDA
    (EMA and SWA accumulators under averaging_on_host: one fp32 model each, 7.15 GB at the full shape)."""
    if host is None:
        return tensor.detach().clone()
    copy_ = tensor.detach().to(host, copy=True)
    return copy_.pin_memory() if tensor.device.type == "cuda" else copy_


def member_seed(hp: Hyperparameters, member: int) -> int:
    """Member 0 uses --seed itself, so --ensemble_size 1 is exactly the plain run."""
    return hp.seed + 1000 * member


def member_tag(hp: Hyperparameters, member: int) -> str:
    """'member 2 of 4 | ' before a member's progress lines when there are several, nothing for a single model. Members
    count from 0, as in the file names (member_02.pt), the metrics rows and the README."""
    return f"member {member} of {hp.ensemble_size} | " if hp.ensemble_size > 1 else ""


def build_model(hp: Hyperparameters, dist_info: Dist, seed: int) -> GPT:
    torch.manual_seed(seed)
    with torch.device(dist_info.device):
        model = GPT(model_config(hp), attention_backend(hp, dist_info.device))
    if dist_info.world_size > 1:  # belt and braces: every rank starts from rank 0's weights
        for p in model.parameters():
            dist.broadcast(p.data, src=dist_info.first_global_rank, group=dist_info.group)
    return model


def perturb_weights(model: nn.Module, scale: float, seed: int, stat: str = "rms") -> None:
    """Adds Gaussian noise of `scale` times each tensor's RMS (stat "std": its unbiased standard deviation, and
    one-element tensors untouched, as the unlimited record's perturb_weights), from a seeded generator so every rank
    adds the same noise (snapshot ensembles with noise at cycle boundaries push the next cycle to a different basin)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if stat == "std" and p.numel() <= 1:
                continue
            noise = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
            if stat == "std":  # head_mix stacks the record's three Q/K/V mixing matrices: each its own deviation
                spread = p.float().flatten(1).std(dim=1).view(-1, 1, 1) if name.endswith("head_mix") else p.float().std()
                p.add_((noise.float() * (spread * scale)).to(p.dtype))
            else:
                p.add_(noise * scale * p.float().square().mean().sqrt().to(p.dtype))


def snapshot_noise_scale(cycle: int, cycles: int, hp: Hyperparameters) -> float:
    """The noise's scale after cycle `cycle` = 1..C-1 of C (none after the last): snapshot_noise, or with
    snapshot_noise_min the unlimited record's cosine from snapshot_noise (cycle 1) down to the min (cycle C-1)."""
    if not hp.snapshot_noise_min:
        return hp.snapshot_noise
    progress = (cycle - 1) / max(1, cycles - 2)
    return hp.snapshot_noise_min + (hp.snapshot_noise - hp.snapshot_noise_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def final_window_stage(hp: Hyperparameters, schedule: "MemberSchedule") -> int:
    """The window schedule's stage of the epoch the member's run ends in."""
    last_epoch = math.ceil(schedule.train_data.epoch_position(schedule.total_steps))
    return window_schedule_stage(parse_window_schedule(hp.window_schedule), last_epoch)


@contextmanager
def final_inference_state(model: GPT, hp: Hyperparameters, schedule: "MemberSchedule"):
    """with final_inference_state(model, ...): the model in the schedule state of the member's last step, its own
    state back after. The public records score their averaged epoch checkpoints by loading each into the final model
    (two_hour/train.py 1024, 1395), so the 2h record's epoch-12 and -13 weights run with the looped layers on, the
    last window stage and its YaRN (no change for 1h: loops on from epoch 7). The window state is a function of the
    stage alone, so going back is exact."""
    loop_active, stage = model.loop_active, getattr(model, "window_stage", None)
    if hp.loop_repeats:
        model.loop_active = schedule.total_steps - 1 >= loop_start_step(hp, schedule.train_data, schedule.schedule_steps)
    if hp.window_schedule:
        set_window_schedule_stage(model, final_window_stage(hp, schedule))
    try:
        yield model
    finally:
        model.loop_active = loop_active
        if hp.window_schedule:
            set_window_schedule_stage(model, stage)


def window_schedule_step(model: GPT, train_data: TrainData, step: int, log: "RunLog | None", tag: str,
                         compiled: bool) -> None:
    """The window schedule at a step: the stage of its epoch from the epoch's first step (the 2h record switches
    after the previous epoch's end evaluation); a change, and the first step, logged with the windows, YaRN's scale
    and the compile cost (one new graph per stage, each evaluation mode's too)."""
    config = model.config
    stages = parse_window_schedule(config.window_schedule)
    epoch = train_data.locate(step)[0] + 1
    stage = window_schedule_stage(stages, epoch)
    if stage == model.window_stage and step:
        return
    set_window_schedule_stage(model, stage)
    if log is None:
        return
    first, last, short, long = stages[stage]
    growth = model.yarn_growths[-1] if config.yarn and model.yarn_growths else None
    log.write(f"{tag}window stage {stage + 1}/{len(stages)} (epochs {first}-{last}) from step {step}: short {short}, "
              f"long {long} keys" + (f" | YaRN {growth[0]} -> {growth[1]}" if growth else "") +
              (f" | softmax scale {model.blocks[0].attn.softmax_scale[0]:.6f}" if config.yarn else "") +
              (" | torch.compile: new windows, so a recompile (one graph per stage and loop state, train and eval)"
               if compiled and step else ""))
    log.metrics(dict(kind="window_stage", step=step, stage=stage + 1, window_short=short, window_long=long,
                     softmax_scale=model.blocks[0].attn.softmax_scale[0] if config.yarn else None))


def loop_start_step(hp: Hyperparameters, train_data: TrainData, total_steps: int) -> float:
    """The first step with looped layers on: the first step of (1-based) epoch loop_start_epoch (the 1h record: 7,
    after 6 of its 11 epochs), else loop_start_frac of training."""
    if hp.loop_start_epoch:
        return train_data.epoch_start(hp.loop_start_epoch - 1)
    return hp.loop_start_frac * total_steps


def recurrence_on(step: int, total_steps: int, hp: Hyperparameters) -> bool:
    """Whether step (0-based, before its update) runs all recurrence passes: from the fraction recurrence_start_frac
    of training on, compared as the 15min record does (step / N >= 0.7: steps 1995.. of its 2850)."""
    return step / total_steps >= hp.recurrence_start_frac


class MemberSchedule:
    """A member's plan: its data order (a pure function of seed and epoch), its steps, where epochs end, the steps
    whose weights become snapshots, and each step's settings (LR, weight decay, momentum, looped layers, windows)."""

    def __init__(self, hp: Hyperparameters, dist_info: Dist, data: RunData, member: int):
        self.hp, self.member = hp, member
        train_data_class = FixedOrderTrainData if hp.train_order == "fixed" else TrainData  # F18a
        cycle_epochs = hp.num_epochs // hp.snapshot_cycles if hp.snapshot_cycle_epochs and hp.snapshot_cycles else 0
        self.train_data = train_data_class(data.train_tokens, hp.bos_id, hp.seq_len, hp.batch_tokens // hp.seq_len,
                                           hp.device_batch_size, dist_info.world_size, dist_info.rank,
                                           member_seed(hp, member), batch_schedule(hp), public_steps=hp.public_steps,
                                           epochs=hp.num_epochs, cycle_epochs=cycle_epochs)
        full_steps = self.train_data.run_steps(hp.num_epochs)
        self.total_steps = total_steps = min(hp.max_steps, full_steps) if hp.max_steps else full_steps
        # the run length the schedules see: the steps run, or the public's N (public_steps; one less at most)
        self.schedule_steps = total_steps if total_steps < full_steps else self.train_data.schedule_steps(hp.num_epochs)
        # snapshot ensembles: the steps whose weights become candidates (each LR cycle's end, the final epochs' ends);
        # the last step's weights are the member itself
        final_epoch = math.ceil(self.train_data.epoch_position(total_steps))  # the epoch the run ends in (or at)
        epoch_ends = [min(total_steps, self.train_data.epoch_start(final_epoch - k)) for k in range(hp.epoch_snapshots)]
        cycle_ends = snapshot_cycle_bounds(hp, total_steps, self.train_data)
        if hp.snapshot_cycles and (len(set(cycle_ends)) < hp.snapshot_cycles or cycle_ends[0] <= hp.warmup_steps):
            raise ConfigError(f"snapshot_cycles {hp.snapshot_cycles}: this run has {total_steps} steps and "
                              f"{hp.warmup_steps} warmup steps; each cycle needs steps of its own, the first past the "
                              f"warmup")
        self.snapshot_steps = sorted({step for step in epoch_ends + cycle_ends if 0 < step < total_steps})

    def start_step(self, step: int, optimizers: list[torch.optim.Optimizer], model: GPT, log: "RunLog | None" = None,
                   tag: str = "", compiled: bool = False) -> float:
        """Sets the step's optimizer schedules, looped layers and windows (the one home of both window schedules:
        the warmup's growing fractions, or the per-epoch stages, each change logged); returns its LR factor."""
        hp = self.hp
        factor = apply_schedules(optimizers, step, self.schedule_steps, self.train_data, hp)
        if hp.loop_repeats:  # looped layers switch on at loop_start_step (a new graph for torch.compile, once)
            model.loop_active = step >= loop_start_step(hp, self.train_data, self.schedule_steps)
        if hp.recurrence > 1:  # the 15min record's recurrence switches on once (a second torch.compile graph)
            model.recurrence_active = recurrence_on(step, self.schedule_steps, hp)
        if hp.window_warmup_frac:  # a new graph for torch.compile at each stage, window_warmup_stages in all
            model.set_window_stage(window_stage(step, self.schedule_steps, hp), hp.window_warmup_stages)
        elif model.config.window_schedule:  # the stage of the step's epoch (its windows, YaRN), logged on a change
            window_schedule_step(model, self.train_data, step, log, tag, compiled)
        return factor

    def epoch_end(self, done: int) -> bool:
        return self.train_data.locate(done)[1] == 0

    def validate_after(self, done: int) -> bool:
        every = self.hp.val_every
        return done == self.total_steps or (self.epoch_end(done) and every >= 0) or (every > 0 and done % every == 0)

    def stop_after(self, done: int) -> bool:
        """--stop_at_step counts over the members one after another (a test aid: stop, then resume)."""
        return bool(self.hp.stop_at_step) and self.member * self.total_steps + done == self.hp.stop_at_step


class MemberObjective:
    """What a micro-step minimises: next-token cross-entropy, or with teachers the distillation mix; on the eager
    path or the fused loss (Kernels). training_loss_sums adds multi-token prediction."""

    def __init__(self, hp: Hyperparameters, device: torch.device, teachers: list[tuple[GPT, float]],
                 dist_info: Dist | None = None):
        self.hp, self.teachers = hp, teachers
        self.backend = loss_backend(hp, device)
        self.fused = (self.backend, hp.logit_softcap) if self.backend != "eager" else None
        self.chunk_rows = chunked_loss_rows(hp, device) if self.backend == "eager" else 0  # CPU memory
        self.dist_info = dist_info or Dist(device=device)
        self.held, self.holding = None, ExitStack()  # one teacher kept on the device for as long as it teaches
        self.heads = {}  # id(teacher) -> its TeacherHead, when several teachers stream through the device
        self.offset_weights = None  # mtp_offsets: this step's weights of the targets t, t+1, .. (start_step)
        if hp.mtp_offsets:
            self.backend = f"multi-offset ({'fp8 lm_head' if hp.fp8_head else 'chunked PyTorch'})"

    def start_step(self, step: int, total_steps: int) -> None:
        """The step's multi-offset weights (the extra offsets fade out over mtp_anneal_frac of training)."""
        if self.hp.mtp_offsets:
            self.offset_weights = mtp_offset_weights(step, total_steps, self.hp)

    def teacher_features(self, inputs: torch.Tensor) -> tuple[list[tuple[nn.Module, float]], list[torch.Tensor]]:
        """(teachers as the loss uses them, their features). One teacher comes to the device once and stays until
        release(); several come one at a time for their features, their lm_heads (TeacherHead) staying."""
        if len(self.teachers) == 1:
            teacher = self.teachers[0][0]
            if self.held is not teacher:
                self.release()
                self.holding.enter_context(frozen_on_device(teacher, self.dist_info))
                self.held = teacher
            return self.teachers, [teacher.features(inputs)]
        self.release()
        features = []
        for teacher, _ in self.teachers:
            with frozen_on_device(teacher, self.dist_info):
                features.append(teacher.features(inputs))
                if id(teacher) not in self.heads:  # copied while whole on the device (a split teacher is empty after)
                    self.heads[id(teacher)] = TeacherHead(teacher, self.dist_info.device)
        heads = [self.heads[id(teacher)] for teacher, _ in self.teachers]
        return [(head, weight) for head, (_, weight) in zip(heads, self.teachers)], features

    def release(self) -> None:
        """The held teacher goes back to the host (a member's end, or the teacher changes)."""
        self.holding.close()
        self.held = None

    @property
    def distilling(self) -> bool:
        return self.hp.distill_alpha > 0 and bool(self.teachers)

    def sums(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token loss, summed objective) of one micro-batch."""
        hp, distill = self.hp, None
        if self.offset_weights is not None:  # the 15min record's loss (no distillation with it: check_data_and_model)
            return multi_offset_loss_sums(model, inputs, targets, self.offset_weights, hp.logit_softcap, hp.fp8_head)
        if self.distilling:
            with torch.no_grad():
                teachers, features = self.teacher_features(inputs)
            if self.fused is not None:  # the same mix, teacher rows made chunk by chunk inside the fused loss
                distill = dict(teacher_rows=teacher_rows(teachers, features, hp.distill_temperature),
                               alpha=hp.distill_alpha, temperature=hp.distill_temperature,
                               chunk_rows=hp.distill_chunk * inputs.size(0))
            else:
                distill = functools.partial(distillation_loss_sum, teachers=teachers, teacher_features=features,
                                            targets=targets, alpha=hp.distill_alpha,
                                            temperature=hp.distill_temperature, chunk=hp.distill_chunk)
        if self.chunk_rows and distill is None:
            return chunked_loss_sums(model, inputs, targets, hp.logit_softcap, self.chunk_rows)
        # distill_mtp_inside: (1 - a)(CE + w MTP) + a T^2 KL, the unlimited record's fold of the MTP term
        mtp_weight = hp.mtp_weight * (1 - hp.distill_alpha) if distill is not None and hp.distill_mtp_inside \
            else hp.mtp_weight
        return training_loss_sums(model, inputs, targets, mtp_weight, distill, self.fused, hp.mtp_style)


# Weight averaging: each kind has after_step(done, model), called once after every optimizer step, and
# state() / restore(saved, model) for the checkpoint (saved under its key; None: nothing of its own to save).

class EMAAveraging:
    """ema_decay > 0: an EMA of the weights from ema_start_frac, updated every ema_every steps, blended into the
    final weights (ema_blend)."""
    key = "ema"

    def __init__(self, hp: Hyperparameters, total_steps: int):
        self.hp, self.total_steps, self.ema = hp, total_steps, None
        self.host = torch.device("cpu") if hp.averaging_on_host == "on" else None

    def after_step(self, done: int, model: nn.Module) -> None:
        hp = self.hp
        if hp.ema_candidate:
            self.record_step(done, model)
            return
        if hp.ema_decay <= 0 or done < hp.ema_start_frac * self.total_steps:
            return
        if self.ema is None:
            self.ema = WeightEMA(model, hp.ema_decay, self.host)
        elif done % hp.ema_every == 0:
            self.ema.update(model)
        if done == self.total_steps:
            self.ema.blend_into(model, hp.ema_blend)

    def record_step(self, done: int, model: nn.Module) -> None:
        """ema_candidate, the 15min record's EMA (tiny/train.py 1336-1337, 1448-1449): from zero, updated after the
        optimizer steps 0, k, 2k, .. (done = 1, k + 1, ..); candidate_weights bias-corrects it."""
        if (done - 1) % self.hp.ema_every:
            return
        if self.ema is None:
            self.ema = WeightEMA(model, self.hp.ema_decay, self.host)
            torch._foreach_zero_(self.ema.averages)
        self.ema.update(model)

    def candidate_weights(self, done: int) -> list[torch.Tensor] | None:
        """The EMA after `done` steps divided by 1 - decay^updates (Adam's bias correction: it started from zero)."""
        if self.ema is None:
            return None
        updates = len(range(0, done, self.hp.ema_every))
        return [average / (1.0 - self.hp.ema_decay ** updates) for average in self.ema.averages]

    def state(self):
        return self.ema.averages if self.ema is not None else None

    def restore(self, saved: dict, model: nn.Module) -> None:
        if saved.get(self.key) is not None:
            self.ema = WeightEMA(model, self.hp.ema_decay, self.host)
            self.ema.averages = [host_copy(a, self.host) if self.host else a for a in saved[self.key]]


class CheckpointAverage:
    """The weight-space average of a run's last N epoch-end weights, every parameter, recency-weighted i / sum(i)
    oldest first (or equal), kept as one running weighted sum (host memory under averaging_on_host). One
    mathematics, two uses:
      ckpt_avg_epochs: the 15min record's average, scored at the end as a candidate of its own (tiny/train.py
        1510-1517, 1568-1593; records #8/#9);
      swa_epochs (final=True): SWA (Izmailov et al. 2018), the equal average the run ends on, each of its epochs at
        the floor of its own cosine LR cycle (apply_schedules)."""

    def __init__(self, hp: Hyperparameters, schedule: MemberSchedule | None = None, final: bool = False,
                 log: "RunLog | None" = None, tag: str = ""):
        self.hp, self.schedule, self.final, self.log, self.tag = hp, schedule, final, log, tag
        self.epochs, self.weights = (hp.swa_epochs, "equal") if final else (hp.ckpt_avg_epochs, hp.ckpt_avg_weights)
        self.key = "swa" if final else "ckpt_avg"
        self.host = torch.device("cpu") if hp.averaging_on_host == "on" else None
        self.total, self.weight_sum, self.count = None, 0.0, 0

    def after_step(self, done: int, model: nn.Module) -> None:
        schedule = self.schedule
        if not self.epochs or not (schedule.epoch_end(done) or done == schedule.total_steps) or \
                schedule.train_data.epoch_position(done) <= \
                schedule.train_data.epoch_position(schedule.total_steps) - self.epochs:
            return
        self.add(list(model.parameters()))
        if self.final and done == schedule.total_steps:  # SWA: the run ends on the average
            with torch.no_grad():
                for p, total in zip(model.parameters(), self.total):
                    p.copy_(total / self.weight_sum)
            self.log.write(f"{self.tag}swa | weights averaged over the ends of the final {self.count} epochs")

    @torch.no_grad()
    def add(self, params: list[torch.Tensor]) -> None:
        """One epoch end's weights join the sum with weight i (the i-th added; equal: 1)."""
        self.count += 1
        weight = float(self.count) if self.weights == "recency" else 1.0
        if self.total is None:
            self.total = [host_copy(p, self.host).mul_(weight) for p in params]
        else:
            for total, p in zip(self.total, params):
                total.add_(p.detach().to(total.device), alpha=weight)
        self.weight_sum += weight

    def average(self) -> list[torch.Tensor] | None:
        """sum_i w_i theta_i / sum_i w_i, or None before two epoch ends (the record averages from two on)."""
        return [total / self.weight_sum for total in self.total] if self.count >= 2 else None

    def state(self):
        return (self.total, self.weight_sum, self.count) if self.total is not None else None

    def restore(self, saved: dict, model: nn.Module) -> None:
        if saved.get(self.key) is not None:
            state = saved[self.key]
            if len(state) == 2:  # an SWA state of earlier versions: (sum, count), every weight 1
                state = (state[0], float(state[1]), state[1])
            total, self.weight_sum, self.count = state
            self.total = [host_copy(t, self.host) if self.host else t for t in total]


def score_weight_candidates(hp: Hyperparameters, dist_info: Dist, data: RunData, log: RunLog, tag: str,
                            model: GPT, ema: EMAAveraging, average: CheckpointAverage, done: int) -> list[dict]:
    """The 15min record's end-of-run candidates, each a frozen host copy of the model (GPT.for_inference, parked: on
    the device only while scored) holding other weights: the bias-corrected EMA (ema_candidate) and the checkpoint
    average (ckpt_avg_epochs), scored on val and, with val_public_windows, on the public windows. Rows in the
    record's order with the rule by which each may replace the public figure (public_figure_rows)."""
    made = []  # (label, rule, the weights made on demand: one averaged copy at a time)
    if hp.ema_candidate and ema.ema is not None:
        made.append(("EMA", "bpb", functools.partial(ema.candidate_weights, done)))
    if average.count >= 2:
        made.append((f"checkpoint average of the last {average.count} epoch ends, {hp.ckpt_avg_weights} weights",
                     "loss", average.average))
    rows = []
    for label, rule, weights in made:
        candidate = frozen_host_copy(model, dist_info)
        with torch.no_grad():
            for param, weight in zip(candidate.parameters(), weights()):
                param.copy_(weight)
        row = dict(label=label, rule=rule,
                   val_loss=score([candidate], [1.0], data.val_data, dist_info, hp.val_batch_size)[0])
        if data.public_data is not None:
            with frozen_on_device(candidate, dist_info):
                row["val_loss_public"], row["val_bpb_public"] = score(
                    [candidate], [1.0], data.public_data, dist_info, hp.val_batch_size, token_bytes=data.token_bytes)
        public = f" | val_loss_public {row['val_loss_public']:.4f}" if "val_loss_public" in row else ""
        log.write(f"{tag}candidate | {label} | val_loss {row['val_loss']:.4f}{public}")
        log.metrics(dict(kind="ema_candidate" if rule == "bpb" else "ckpt_avg_candidate", step=done, **row))
        rows.append(row)
    return rows


class Snapshots:
    """Snapshot ensembles: at each snapshot step (an LR cycle's or a final epoch's end) the weights become a frozen,
    scored and saved ensemble candidate; then, when asked, noise pushes the next cycle to another basin."""
    key = None  # the snapshots are their own files, reloaded on resume

    def __init__(self, hp: Hyperparameters, dist_info: Dist, data: RunData, log: RunLog, member: int,
                 schedule: MemberSchedule, progress: MemberProgress):
        self.hp, self.dist_info, self.data, self.log, self.member = hp, dist_info, data, log, member
        self.schedule, self.progress, self.seed = schedule, progress, member_seed(hp, member)
        self.taken: list[tuple[GPT, float]] = []  # (frozen model, its val loss) for every snapshot step passed

    def after_step(self, done: int, model: nn.Module) -> None:
        steps, total_steps, member = self.schedule.snapshot_steps, self.schedule.total_steps, self.member
        if done not in steps:
            return
        cycle = steps.index(done)
        with self.progress.paused():
            # scored as the training model itself on SDPA (what the frozen copy runs, GPT.for_inference), then copied
            # straight to host memory: no second model on the device
            attention, model.attention = model.attention, "sdpa"
            loss = score([model], [1.0], self.data.val_data, self.dist_info, self.hp.val_batch_size)[0]
            model.attention = attention
            with final_inference_state(model, self.hp, self.schedule) if self.hp.epoch_snapshots else nullcontext():
                # epoch snapshots are averaged as the records average them: in the final model's state
                if self.dist_info.is_main:  # the training model's weights and schedule state: what the snapshot copies
                    save_candidate(snapshot_path(self.log.folder, member, cycle), model, member=member, cycle=cycle,
                                   seed=self.seed, outcome=dict(val_loss=loss), tokenizer=self.hp.tokenizer)
                # candidates_on_disk: the file stands for it, once it no longer teaches (on_disk_twin below)
                snapshot = keep_frozen(model, frozen_store(self.hp, self.dist_info), candidates_on_disk(self.hp),
                                       snapshot_path(self.log.folder, member, cycle), self.dist_info.first_global_rank,
                                       teaches=self.hp.snapshot_distill, copy=True)
        self.taken.append((snapshot, loss))
        self.taken[:-1] = [(on_disk_twin(frozen), loss) for frozen, loss in self.taken[:-1]]  # only the latest teaches
        self.log.write(f"{member_tag(self.hp, member)}snapshot {cycle} of {len(steps) + 1} | step {done}/"
                       f"{total_steps} | val_loss {loss:.4f}")
        self.log.metrics(dict(kind="snapshot", member=member, cycle=cycle, step=done, val_loss=loss))
        if self.hp.snapshot_noise > 0:
            perturb_weights(model, snapshot_noise_scale(cycle + 1, len(steps) + 1, self.hp), self.seed * 1000 + cycle,
                            self.hp.snapshot_noise_stat)

    def state(self):
        return None

    def restore(self, saved: dict, model: nn.Module) -> None:
        """The snapshots taken before the interruption, from their files."""
        for cycle, end in enumerate(self.schedule.snapshot_steps):
            if saved["progress"]["step"] >= end:
                path = snapshot_path(self.log.folder, self.member, cycle)
                snapshot, info = load_member(path, self.dist_info.host)
                store = frozen_store(self.hp, self.dist_info)
                self.taken.append((keep_frozen(snapshot.requires_grad_(False), store, candidates_on_disk(self.hp), path,
                                               self.dist_info.first_global_rank, teaches=self.hp.snapshot_distill),
                                   info["outcome"]["val_loss"]))
                self.taken[:-1] = [(on_disk_twin(frozen), loss) for frozen, loss in self.taken[:-1]]


class PublicEvaluation:
    """val_public_windows: at every epoch end (and the last step) the model is also scored on the public records' val
    windows, loss and bits per byte, logged beside val_loss; the rows give the public figure (public_figure_rows)."""
    key = "public_evals"

    def __init__(self, hp: Hyperparameters, dist_info: Dist, data: RunData, log: RunLog, schedule: MemberSchedule,
                 progress: MemberProgress, tag: str):
        self.hp, self.dist_info, self.data, self.log, self.tag = hp, dist_info, data, log, tag
        self.schedule, self.progress, self.rows = schedule, progress, []

    def after_step(self, done: int, model: nn.Module) -> None:
        schedule = self.schedule
        if self.data.public_data is None or not (schedule.epoch_end(done) or done == schedule.total_steps):
            return
        with self.progress.paused():
            attention, model.attention = model.attention, "sdpa"  # eager: SDPA's dense mask beats eager Flex
            try:
                loss, bpb = score([model], [1.0], self.data.public_data, self.dist_info, self.hp.val_batch_size,
                                  token_bytes=self.data.token_bytes)
            finally:
                model.attention = attention
        epoch = round(schedule.train_data.epoch_position(done), 4)
        # the 15min record counts only evaluations at its full recurrent depth (tiny/train.py 1519)
        full_depth = model.recurrence == 1 or model.recurrence_active
        self.rows.append(dict(step=done, epoch=epoch, val_loss=loss, val_bpb=bpb, full_depth=full_depth))
        self.log.write(f"{self.tag}val_public step {done}/{schedule.total_steps} | epoch {epoch:.2f} | "
                       f"val_loss_public {loss:.4f} | val_bpb_public {bpb:.4f} | "
                       f"{self.data.public_data.num_windows} public windows")
        self.log.metrics(dict(kind="val_public", step=done, epoch=epoch, val_loss_public=loss, val_bpb_public=bpb))

    def state(self):
        return self.rows

    def restore(self, saved: dict, model: nn.Module) -> None:
        self.rows = list(saved.get(self.key) or [])


def compiled_model(raw_model: GPT, hp: Hyperparameters, device: torch.device) -> nn.Module:
    """torch.compile'd where asked (auto: on CUDA), else the model itself."""
    if not (hp.compile == "on" or (hp.compile == "auto" and device.type == "cuda")):
        return raw_model
    # each window stage, loop on/off and train/eval is its own graph: torch's default of 8 recompiles per function
    # would silently fall back to eager past it (the public slowrun scripts raise it to 64 too)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(raw_model)


def train_member(hp: Hyperparameters, dist_info: Dist, data: RunData, log: RunLog, member: int,
                 teachers: list[tuple[GPT, float]], work: RunWork | None = None) -> dict:
    """One model from initialisation (or its last checkpoint) to its final validation. With teachers (frozen models
    and their mixture weights) and distill_alpha > 0 it learns from their softened predictions as well."""
    device, tag, seed = dist_info.device, member_tag(hp, member), member_seed(hp, member)
    schedule = MemberSchedule(hp, dist_info, data, member)
    train_data, total_steps = schedule.train_data, schedule.total_steps
    raw_model = build_model(hp, dist_info, seed)
    torch.manual_seed(seed + 1 + dist_info.rank)  # dropout masks differ across ranks
    model = compiled_model(raw_model, hp, device)
    optimizers = build_optimizers(raw_model, hp, dist_info)
    objective = MemberObjective(hp, device, teachers, dist_info)
    grad_sync = GradientSync(hp, raw_model, dist_info)
    work = work or RunWork(hp, dist_info, dist_info, data, schedule)  # train() passes the whole run's
    progress = MemberProgress(hp, dist_info, log, member, schedule, compiled=model is not raw_model, work=work)
    snapshots = Snapshots(hp, dist_info, data, log, member, schedule, progress)
    public = PublicEvaluation(hp, dist_info, data, log, schedule, progress, tag)
    ema, checkpoint_average = EMAAveraging(hp, total_steps), CheckpointAverage(hp, schedule)
    averaging = [ema, CheckpointAverage(hp, schedule, final=True, log=log, tag=tag), snapshots, public,
                 checkpoint_average]
    if member == 0 or hp.ensemble_size > 1:
        scheduled_epochs = range(min(hp.num_epochs, len(train_data.schedule)))  # then constant
        steps_per_epoch = "/".join(str(train_data.steps_in(epoch)) for epoch in scheduled_epochs)
        log.write(f"{tag}seed {seed} | {steps_per_epoch} steps/epoch x {hp.num_epochs} epochs -> "
                  f"{total_steps} steps | compile {'on' if model is not raw_model else 'off'} | loss "
                  f"{objective.backend}{f' in {objective.chunk_rows}-row chunks' if objective.chunk_rows else ''} | "
                  f"attention {raw_model.attention}{' + document mask' if hp.doc_mask else ''}" +
                  (f" | distilling from {len(teachers)} teacher(s), alpha {hp.distill_alpha}, "
                   f"T {hp.distill_temperature}" if objective.distilling else ""))
    checkpoint = MemberCheckpoint(log.folder, member, dist_info, hp, log=log)
    resumed = checkpoint.resume(raw_model, optimizers, progress.state, averaging)
    validate_again = resumed and progress.state["step"] == total_steps  # killed after the last step
    if resumed:
        log.write(f"{tag}resumed from {checkpoint.path} at step {progress.state['step']}/{total_steps}")
    checkpoint.check_ranks_agree(progress.state["step"], tag)
    progress.begin()
    model.train()
    for step in range(progress.state["step"], total_steps):
        epoch, step_in_epoch = train_data.locate(step)
        factor = schedule.start_step(step, optimizers, raw_model, log, tag, compiled=model is not raw_model)
        objective.start_step(step, schedule.schedule_steps)
        if hp.snapshot_distill and len(snapshots.taken) >= max(1, hp.snapshot_distill_after):
            objective.teachers = [(snapshots.taken[-1][0], 1.0)]  # each cycle learns from the latest snapshot
        step_targets = train_data.step_target_count(epoch, step_in_epoch)
        accumulation = live_micro_steps(train_data, epoch, step_in_epoch, dist_info.rank)  # all-padding ones skipped
        for micro_step in range(accumulation):
            inputs, targets = train_data.micro_batch(epoch, step_in_epoch, micro_step)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast_context(device):
                micro_loss, loss = objective.sums(model, inputs, targets)
            grad_sync.arm(micro_step == accumulation - 1)  # the last micro-step's gradients are the step's sums
            (loss / step_targets).backward()
            progress.add_loss(micro_loss)
        grad_sync.wait()  # every gradient summed over ranks (average_gradients, or the hooks' all-reduces)
        if hp.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), hp.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
        raw_model.zero_grad(set_to_none=True)
        done = step + 1
        progress.step_done(done, step_targets, factor)
        for kind in averaging:
            kind.after_step(done, raw_model)
        with progress.paused():  # evaluation and checkpoints do not count as training time
            if done == total_steps:  # the last step on disk before the final validation: a kill there loses nothing
                checkpoint.save(raw_model, optimizers, progress.checkpoint_state(), averaging)
            if schedule.validate_after(done):
                progress.validate(model, data.val_data, done)
            if checkpoint.due_after(done, schedule):
                checkpoint.save(raw_model, optimizers, progress.checkpoint_state(), averaging)
        if schedule.stop_after(done):
            log.write(f"{tag}stopped after step {done} as asked (--stop_at_step {hp.stop_at_step}); continue with "
                      f"--resume {log.folder}")
            raise RunStopped()
    if validate_again:  # a kill after the last step costs only its validation (scoring is deterministic)
        schedule.start_step(total_steps - 1, optimizers, raw_model, log, tag,  # the last step's loops and windows
                            compiled=model is not raw_model)
        with progress.paused():
            progress.validate(model, data.val_data, total_steps)
    objective.release()  # the teacher goes back to the host
    grad_sync.remove()
    with progress.paused():
        candidates = score_weight_candidates(hp, dist_info, data, log, tag, raw_model, ema, checkpoint_average,
                                             total_steps)
    state = progress.state
    return dict(model=raw_model, compiled=model, snapshots=snapshots.taken, snapshot_count=len(snapshots.taken),
                val_loss=state["val_loss"], train_loss=state["train_loss"], tokens_seen=state["tokens_seen"],
                steps=total_steps, train_seconds=state["train_seconds"], epochs=train_data.epoch_position(total_steps),
                agree=ranks_agree(raw_model, dist_info), public_evals=public.rows, weight_candidates=candidates)


# ----------------------------------------------------------------------------------------------------------------------
# The ensemble loop: members in turn, the running ensemble scored, averaged, selected, tested (train)


def train(hp: Hyperparameters, dist_info: Dist, argv: list[str]) -> dict:
    """A run, the ensemble algorithm: members trained one after another (or a round of them at once, one per group
    of ranks), member k distilled from earlier ones when distill_alpha > 0; the running ensemble scored after each;
    the candidates (the members and their snapshots) averaged, chosen on held-out train data when fitness_tokens > 0,
    and the held-out test scored once. A single model is an ensemble of one. Returns what result.json holds. Where
    finished models live (device, host, shards, files), the run folder and a resume are the harness's: start_run,
    CandidatePool and finish_run, below the banner."""
    run = start_run(hp, dist_info, argv)  # checks, memory plan, data, the run folder (or a killed run's end)
    if run.result is not None:
        return run.result
    hp, data, log = run.hp, run.data, run.log
    pool = CandidatePool(hp, dist_info, run.folder, log)
    work = RunWork(hp, dist_info, pool.group, data, MemberSchedule(hp, pool.group, data, 0))  # the whole run's ETA
    weights = parse_weights(hp.ensemble_weights, candidate_count(hp)) if hp.ensemble_weights else None
    ensemble_losses = []  # the running ensemble's val loss after each member
    for round_members in pool.rounds():  # one member per group of ranks (parallel_members), round after round
        member = pool.member_to_train(round_members)  # none when this group's was finished before a --resume
        if member is not None:
            teachers = distillation_teachers(hp, pool.members, pool.outside_teachers)
            pool.add_trained(member, train_member(hp, pool.group, data, pool.group_log, member, teachers, work))
        for member in pool.close_round(round_members):  # each member of the round joins the candidates, in order
            if candidate_count(hp) > 1:  # the ensemble so far
                ensemble_losses.append(score_running_ensemble(hp, pool.candidates, pool.outcomes, weights, data,
                                                              dist_info, work, log))
    pool.close()  # no member teaches any more: every frozen model split over the world (or its file)

    candidates, outcomes = pool.candidates, pool.outcomes
    val_loss = ensemble_losses[-1] if ensemble_losses else outcomes[0]["val_loss"]
    final = (candidates, weights or [1.0 / len(candidates)] * len(candidates))  # the ensemble: models, mixture
    averages = {"ensemble": final} if len(candidates) > 1 else {}  # label -> (models, weights) the public figure takes
    if hp.epoch_snapshot_weights != "equal" and hp.ensemble_size == 1 and len(candidates) > 1:
        averages, losses = score_snapshot_weightings(hp, candidates, data, dist_info, log)  # the 1h record's two
        if hp.epoch_snapshot_weights == "recency":
            final, val_loss = averages["epoch snapshots, recency weights"], losses["recency"]
    selection = None
    if data.fitness_data is not None:  # choose on held-out train data, never on val
        final, selection = select_candidates(hp, candidates, data, dist_info, log)
        val_loss = selection["val_loss"]
    test_loss = None
    if data.test_data:  # scored once, after every choice
        test_loss = score(*final, data.test_data, dist_info, hp.val_batch_size, hp.ensemble_mode)[0]
        log.write(f"test (held out, scored once) | test_loss {test_loss:.4f} | val_loss {val_loss:.4f}")
    return finish_run(run, dist_info, pool, final, averages, val_loss, test_loss, ensemble_losses, selection)


def distillation_teachers(hp: Hyperparameters, members: list, outside: list) -> list[tuple[nn.Module, float]]:
    """The next member's teachers and their weights: a finished run's members equally (distill_from: `outside`),
    the previous member (the public chain, Hinton et al. 2015's distillation from the last model) or every earlier
    member equally (distill_teacher ensemble); none for the unlimited record's independent chains
    (snapshot_distill_after), whose snapshots teach inside a member."""
    if outside:
        return [(teacher, 1.0 / len(outside)) for teacher in outside]
    if hp.snapshot_distill_after:
        return []
    earlier = members if hp.distill_teacher == "ensemble" else members[-1:]  # members[-1]: the previous round's last
    return [(teacher, 1.0 / len(earlier)) for teacher in earlier]


def score_running_ensemble(hp: Hyperparameters, candidates: list, outcomes: list[dict], weights: list[float] | None,
                           data: "RunData", dist_info: Dist, work: "RunWork", log: "RunLog") -> float:
    """The ensemble of every candidate so far (uniform, or ensemble_weights renormalised over them), scored on val
    after each member joins: the size -> loss curve the unlimited records report."""
    count = len(candidates)
    mix = [w / sum(weights[:count]) for w in weights[:count]] if weights else [1.0 / count] * count
    start = time.time()
    loss = score(candidates, mix, data.val_data, dist_info, hp.val_batch_size, hp.ensemble_mode)[0]
    work.add_eval(count * work.val_per_rank, time.time() - start)
    alone = outcomes[-1]["val_loss"]
    log.write(f"ensemble | members {len(outcomes)} | candidates {count} | val_loss {loss:.4f} | "
              f"member {len(outcomes) - 1} alone {alone:.4f}")
    log.metrics(dict(kind="ensemble", members=len(outcomes), candidates=count, val_loss=loss, member_val_loss=alone,
                     tokens_seen=sum(r["tokens_seen"] for r in outcomes)))
    return loss


def score_snapshot_weightings(hp: Hyperparameters, candidates: list, data: "RunData", dist_info: Dist,
                              log: "RunLog") -> tuple[dict, dict]:
    """One model's epoch snapshots averaged under both weightings (the 1h record #12's --logit-avg-mode: equal and
    recency), each scored on val: ({label: (models, weights)}, {weighting: val loss})."""
    averages, losses = {}, {}
    for label, mix in snapshot_mixtures(hp, len(candidates)).items():
        averages[f"epoch snapshots, {label} weights"] = (candidates, mix)
        losses[label] = score(candidates, mix, data.val_data, dist_info, hp.val_batch_size, hp.ensemble_mode)[0]
    log.write(f"epoch snapshots | {len(candidates)} candidates | " +
              " | ".join(f"{label} weights val_loss {loss:.4f}" for label, loss in losses.items()))
    log.metrics(dict(kind="epoch_snapshots", candidates=len(candidates),
                     **{f"val_loss_{k}": v for k, v in losses.items()}))
    return averages, losses


def select_candidates(hp: Hyperparameters, candidates: list, data: "RunData", dist_info: Dist,
                      log: "RunLog") -> tuple[tuple[list, list[float]], dict]:
    """The unlimited record's selection: mixture weights learned on the fitness slice (held-out train documents),
    the top select_top kept (or, with select_top_sweep, every top K scored and the largest kept), the chosen
    ensemble scored on val: ((models, weights), the selection's record)."""
    probs = target_probabilities(candidates, data.fitness_data, dist_info, hp.val_batch_size)
    learned = learn_mixture_weights(probs, hp.select_steps, hp.select_lr, hp.select_clip, hp.select_init_noise)
    chosen = select_members(learned, hp.select_top)
    if top_sweep(hp, len(candidates)):
        chosen = sweep_top_k(hp, learned, candidates, data, dist_info, log)
    models, weights = [candidates[i] for i, _ in chosen], [w for _, w in chosen]
    val_loss = score(models, weights, data.val_data, dist_info, hp.val_batch_size, hp.ensemble_mode)[0]
    selection = dict(learned_weights=learned.tolist(), chosen=[i for i, _ in chosen], weights=weights,
                     val_loss=val_loss)
    log.write(f"selection | learned weights on {data.fitness_data.num_targets:,} fitness tokens: "
              + " ".join(f"c{i}={w:.3f}" for i, w in enumerate(learned.tolist()))
              + f" | kept {', '.join(f'c{i}' for i, _ in chosen)} | val_loss {val_loss:.4f}")
    log.metrics(dict(kind="selection", **selection))
    return (models, weights), selection


# ----------------------------------------------------------------------------------------------------------------------
# Kernels: every fast path next to its plain-PyTorch reference, chosen by one function

LOSS_TILE = 4096  # vocabulary columns per Triton tile: 50,304 = 12.3 tiles; the last one is masked


def fused_loss_available(device: torch.device) -> bool:
    """The Triton loss kernel runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def loss_backend(hp: Hyperparameters, device: torch.device) -> str:
    """Which loss path trains: "triton" (the fused kernel), "chunked" (its PyTorch reference) or "eager" (plain
    F.cross_entropy on float32 soft-capped logits). auto takes Triton on CUDA where it imports and passes its
    self-check (else the chunked reference, with a warning), and eager elsewhere."""
    if hp.fused_loss == "off":
        return "eager"
    if hp.fused_loss == "chunked":
        return "chunked"
    if hp.fused_loss == "on":
        if not fused_loss_available(device):
            raise ConfigError(f"--fused_loss on needs Triton and a CUDA device (triton "
                              f"{'present' if importlib.util.find_spec('triton') else 'missing'}, device "
                              f"{device.type}); use auto or chunked")
        return "triton"
    if device.type == "cuda" and fused_loss_available(device):
        # the kernel variants this run compiles: its vocabulary and soft-cap, bf16 logits (autocast), with and
        # without a distillation teacher
        teachers = (False, True) if hp.distill_alpha > 0 else (False,)
        problems = (triton_loss_self_check(str(device), hp.vocab_size, hp.logit_softcap, teacher, "bfloat16")
                    for teacher in teachers)
        problem = next(filter(None, problems), "")  # the first variant that failed, if any
        if problem:  # auto never trains on a kernel that failed its check here: say so, train on the reference
            print(f"warning: --fused_loss auto: the Triton loss failed its self-check on {device} ({problem}); "
                  f"using the chunked PyTorch reference", file=sys.stderr, flush=True)
            return "chunked"
        return "triton"
    return "eager"


@functools.lru_cache(maxsize=None)  # once per kernel variant and process
def triton_loss_self_check(device_name: str, vocab: int, softcap: float, teacher: bool, dtype_name: str) -> str:
    """"" if the Triton loss kernel compiles here and matches its chunked PyTorch reference on a few random rows of
    the run's shape (its vocabulary in LOSS_TILE tiles, the last one partial; its soft-cap; an ignored target; a
    distillation teacher if `teacher`; logits in `dtype_name`): objective, CE and gradient. Else what went wrong.
    --fused_loss auto runs it before trusting the kernel with a run (no collectives: any rank may call it)."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    rows = 5
    raw = (4 * torch.randn(rows, vocab, generator=generator)).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    targets[-1] = -1
    log_probs = torch.log_softmax(torch.randn(rows, vocab, generator=generator), dim=-1).to(device)
    extra = dict(teacher_rows=lambda a, b: log_probs[a:b], alpha=0.5, temperature=2.0) if teacher else {}
    results = []
    try:
        for backend in ("triton", "chunked"):
            logits = raw.clone().requires_grad_(True)
            objective, ce = fused_loss_sums(logits, targets, softcap, backend, chunk_rows=2, **extra)
            (grad,) = torch.autograd.grad(objective, logits)
            results.append((objective.detach(), ce, grad))
    except Exception as error:  # noqa: BLE001 -- any failure means: do not use the kernel
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # gradients stored in bf16 round at ~4e-3
    for name, fast, reference in zip(("objective", "ce", "gradient"), *results):
        error = ((fast.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()
        if not error < tolerance:
            return f"{name} differs from the reference by {error:.2e} (relative)"
    return ""


def _fused_loss_kernel(logits_ptr, logits_stride, grad_ptr, grad_stride, targets_ptr, teacher_ptr, teacher_stride,
                       objective_ptr, ce_ptr, softcap, inv_temperature, ce_weight, kl_weight, n_cols: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of raw lm_head output x (any float dtype). With z = c tanh(x / c) (the soft-cap), p =
    softmax(z), p_T = softmax(z / T) and q the teacher's probabilities (its log-probs are an input), it writes
        objective = ce_weight * CE(z, target) + kl_weight * KL(q || p_T),   ce = CE(z, target)
    and d objective / dx into grad_ptr, in two passes over the vocabulary in BLOCK-wide tiles: pass 1 keeps running
    maxima and sums (online softmax, Milakov & Gimelshein 2018) for both temperatures, pass 2 writes the gradient.
    Computing the gradient in the forward is the Liger-kernel trick (Hsu et al. 2024, "Liger Kernel"): the loss is
    the graph's end, so backward only rescales it; soft-cap inside the kernel follows modded-nanogpt's fused
    soft-capped CE. Nothing float32 of width vocab is ever stored. Rows with target < 0 give 0 and a zero gradient.
    n_cols (the vocabulary) is a compile-time constant: one compile per vocabulary, and the loop bounds are plain
    ints (Triton 3.5's interpreter cannot take a runtime loop bound under numpy >= 2.4)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    grad_row = grad_ptr + row * grad_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target >= 0
    safe_target = tl.where(valid, target, 0)
    offsets = tl.arange(0, BLOCK)
    z_max = -float("inf")
    z_sum = 0.0
    zt_max = -float("inf")
    zt_sum = 0.0
    q_log_q = 0.0
    q_zt = 0.0
    q_sum = 0.0
    for start in range(0, n_cols, BLOCK):  # pass 1: log-sum-exps, the teacher's sums
        cols = start + offsets
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:  # c tanh(x / c) = c (2 / (1 + exp(-2x / c)) - 1): exp only, no libdevice tanh
            x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)
        z = tl.where(mask, x, -float("inf"))
        new_max = tl.maximum(z_max, tl.max(z, axis=0))
        z_sum = z_sum * tl.exp(z_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        z_max = new_max
        if HAS_TEACHER:
            zt = z * inv_temperature
            new_max_t = tl.maximum(zt_max, tl.max(zt, axis=0))
            zt_sum = zt_sum * tl.exp(zt_max - new_max_t) + tl.sum(tl.exp(zt - new_max_t), axis=0)
            zt_max = new_max_t
            log_q = tl.load(teacher_ptr + row * teacher_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
            q = tl.exp(log_q)
            q_log_q += tl.sum(q * tl.where(q > 0, log_q, 0.0), axis=0)  # 0 log 0 = 0
            q_zt += tl.sum(tl.where(mask, q * x * inv_temperature, 0.0), axis=0)
            q_sum += tl.sum(q, axis=0)
    lse = z_max + tl.log(z_sum)
    x_target = tl.load(logits_row + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        x_target = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x_target / softcap)) - 1.0)
    ce = lse - x_target
    objective = ce_weight * ce
    lse_t = 0.0
    if HAS_TEACHER:  # KL(q || p_T) = sum q log q - sum q z / T + lse_T sum q
        lse_t = zt_max + tl.log(zt_sum)
        objective += kl_weight * (q_log_q - q_zt + lse_t * q_sum)
    tl.store(objective_ptr + row, tl.where(valid, objective, 0.0))
    tl.store(ce_ptr + row, tl.where(valid, ce, 0.0))
    for start in range(0, n_cols, BLOCK):  # pass 2: the gradient, tile by tile
        cols = start + offsets
        mask = cols < n_cols
        x = tl.load(logits_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)
        grad = ce_weight * (tl.exp(x - lse) - tl.where(cols == safe_target, 1.0, 0.0))
        if HAS_TEACHER:  # d KL / dz = (sum q * p_T - q) / T
            log_q = tl.load(teacher_ptr + row * teacher_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
            grad += kl_weight * inv_temperature * (q_sum * tl.exp(x * inv_temperature - lse_t) - tl.exp(log_q))
        if HAS_SOFTCAP:  # dz/dx = 1 - tanh^2 = 1 - (z / c)^2
            grad = grad * (1.0 - (x / softcap) * (x / softcap))
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def triton_jit(kernel_source, interpret: bool):
    """A kernel of this file, JIT-wrapped on first use. Triton is imported here, never by `import train_gpt`: it fixes
    at import whether its library functions are compiled or interpreted (TRITON_INTERPRET=1), and the tests set that
    after importing this file. The kernel's `tl` comes from a copy of its globals, so this module's namespace stays
    as is. `interpret` is part of the cache key: a kernel made for one mode is never reused in the other."""
    import triton
    import triton.language as tl
    kernel = types.FunctionType(kernel_source.__code__, {**globals(), "tl": tl}, kernel_source.__name__,
                                kernel_source.__defaults__)
    kernel.__qualname__ = kernel_source.__qualname__
    # the annotations say which arguments are tl.constexpr (compile-time): without them a GPU compile fails, while
    # the interpreter (the CPU tests) would not notice
    kernel.__annotations__ = dict(kernel_source.__annotations__)
    return triton.jit(kernel)


def fused_loss_rows_triton(logits: torch.Tensor, targets: torch.Tensor, teacher_log_probs: torch.Tensor | None,
                           softcap: float, temperature: float, ce_weight: float, kl_weight: float,
                           grad_out: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (N, V) of raw logits -> (objective per row, CE per row), float32 (N,); d objective / d logits into
    grad_out (N, V), in the logits' dtype."""
    rows, vocab = logits.shape
    objective = torch.empty(rows, dtype=torch.float32, device=logits.device)
    ce = torch.empty_like(objective)
    has_teacher = teacher_log_probs is not None
    teacher = teacher_log_probs if has_teacher else logits  # an unread stand-in pointer when there is no teacher
    kernel = triton_jit(_fused_loss_kernel, os.environ.get("TRITON_INTERPRET") == "1")
    kernel[(rows,)](logits, logits.stride(0), grad_out, grad_out.stride(0), targets, teacher, teacher.stride(0),
                    objective, ce, float(softcap) if softcap > 0 else 1.0, 1.0 / temperature,
                    float(ce_weight), float(kl_weight), n_cols=vocab, HAS_SOFTCAP=softcap > 0, HAS_TEACHER=has_teacher,
                    BLOCK=min(block or LOSS_TILE, 1 << (vocab - 1).bit_length()), num_warps=8)
    return objective, ce


def fused_loss_rows_torch(logits: torch.Tensor, targets: torch.Tensor, teacher_log_probs: torch.Tensor | None,
                          softcap: float, temperature: float, ce_weight: float, kl_weight: float,
                          grad_out: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the same quantities as fused_loss_rows_triton in plain PyTorch (float32 of these rows only;
    the caller hands it chunks of rows), with the gradient written out by hand, not by autograd."""
    z = soft_cap(logits.float(), softcap)
    valid = targets >= 0
    safe_target = targets.clamp(min=0).unsqueeze(-1)
    log_p = F.log_softmax(z, dim=-1)
    ce = -log_p.gather(-1, safe_target).squeeze(-1)
    grad = ce_weight * log_p.exp()
    grad.scatter_add_(-1, safe_target, torch.full_like(safe_target, -ce_weight, dtype=grad.dtype))
    objective = ce_weight * ce
    if teacher_log_probs is not None:
        log_p_t = F.log_softmax(z / temperature, dim=-1)
        log_q = teacher_log_probs.float()
        q = log_q.exp()
        objective = objective + kl_weight * torch.where(q > 0, q * (log_q - log_p_t), 0.0).sum(-1)
        grad += kl_weight / temperature * (q.sum(-1, keepdim=True) * log_p_t.exp() - q)
    if softcap > 0:
        grad *= 1 - (z / softcap).square()
    grad_out.copy_(grad * valid.unsqueeze(-1))
    return objective * valid, ce * valid


class FusedSoftcapLoss(torch.autograd.Function):
    """(summed objective, summed CE) of raw lm_head outputs (N, V), where objective = ce_weight CE + kl_weight
    KL(teacher || student at temperature T). teacher_rows(start, end) gives the teacher's log-probs for rows
    [start, end) (float32, made chunk by chunk), or is None. The gradient is computed in the forward, in chunks of
    chunk_rows rows, into one tensor of the logits' dtype; backward scales it in place (so: one backward only).
    tile: Triton's vocabulary tile (0 = LOSS_TILE; the tests use small ones so a tiny vocabulary spans several)."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_rows, softcap, temperature, ce_weight, kl_weight, chunk_rows, backend,
                tile=0):
        rows_fn = fused_loss_rows_triton if backend == "triton" else fused_loss_rows_torch
        grad = torch.empty_like(logits)
        objective = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce = torch.zeros_like(objective)
        for start in range(0, logits.size(0), chunk_rows):
            end = min(start + chunk_rows, logits.size(0))
            teacher = teacher_rows(start, end) if teacher_rows is not None else None
            chunk_objective, chunk_ce = rows_fn(logits[start:end], targets[start:end], teacher, softcap, temperature,
                                                ce_weight, kl_weight, grad[start:end], tile)
            objective += chunk_objective.sum()
            ce += chunk_ce.sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce)
        return objective, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_objective, grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad.mul_(grad_objective.to(grad.dtype)),) + (None,) * 9


def fused_loss_sums(raw_logits: torch.Tensor, targets: torch.Tensor, softcap: float, backend: str,
                    teacher_rows=None, alpha: float = 0.0, temperature: float = 1.0,
                    chunk_rows: int = 0, tile: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed objective, summed CE) over the valid targets of raw logits (..., V): the objective is CE, or with a
    teacher (1 - alpha) CE + alpha T^2 KL (Hinton et al. 2015). chunk_rows = 0 picks all rows at once for Triton (it
    stores no float32 row) and 1024 rows for the PyTorch reference."""
    flat = raw_logits.reshape(-1, raw_logits.size(-1))  # (N, V)
    ce_weight, kl_weight = (1.0 - alpha, alpha * temperature**2) if teacher_rows is not None else (1.0, 0.0)
    chunk_rows = chunk_rows or (flat.size(0) if backend == "triton" else 1024)
    return FusedSoftcapLoss.apply(flat, targets.reshape(-1), teacher_rows, softcap, temperature, ce_weight,
                                  kl_weight, chunk_rows, backend, tile)


class ChunkedSoftcapCE(torch.autograd.Function):
    """Summed soft-capped cross-entropy of raw lm_head outputs (N, V) on CPU, `rows` positions at a time. The eager
    loss keeps the cap's tanh and the log-softmax, float32 (N, V), for backward and makes four more such tensors in
    it: 200 MB apiece for the tiny preset's 1,024 positions x 50,304, 1.6 GB over the model's own memory (4.8 GB
    peak for a 13M-parameter model). Here one (N, V) tensor serves throughout: the lm_head's output,
    overwritten by the cap's tanh in forward (kept for backward with each target's log-probability), then by the
    gradient in backward (the lm_head's matmul saves its input, never its output). Backward recomputes each
    chunk's log-softmax (activation checkpointing of the loss, Chen et al. 2016) and runs the eager operations on it
    with the incoming gradient. Every row's operations are the eager ones, and the sum is F.nll_loss over the same
    values in the same order: loss and gradients bitwise equal to the eager path (tests/test_newcomer_memory.py)."""

    @staticmethod
    def forward(ctx, raw, targets, softcap, rows):
        picked = torch.empty(raw.size(0), dtype=torch.float32, device=raw.device)
        capped = raw.float()  # with the cap, overwritten by its tanh in place: the lm_head's backward never reads
        if softcap > 0 and (capped is not raw or not raw.is_contiguous()):  # its output (an input here is a copy)
            capped = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
        for start in range(0, raw.size(0), rows):
            chunk = slice(start, start + rows)
            if softcap > 0:  # GPT.head's operations: softcap * tanh(logits / softcap), the tanh kept
                torch.tanh(raw[chunk].float() / softcap, out=capped[chunk])
            logits = softcap * capped[chunk] if softcap > 0 else capped[chunk]
            picked[chunk] = F.log_softmax(logits, dim=-1).gather(-1, targets[chunk].clamp(min=0).unsqueeze(-1))[:, 0]
        ctx.save_for_backward(capped, targets)
        ctx.softcap, ctx.rows = softcap, rows
        return F.nll_loss(picked.unsqueeze(-1), torch.where(targets >= 0, 0, -1), ignore_index=-1, reduction="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        capped, targets = ctx.saved_tensors
        softcap = ctx.softcap
        grad_raw = capped if softcap > 0 else torch.empty_like(capped)  # the tanh, overwritten chunk by chunk
        for start in range(0, capped.size(0), ctx.rows):
            chunk = slice(start, start + ctx.rows)
            with torch.enable_grad():
                tanh = capped[chunk].detach().requires_grad_()
                loss = cross_entropy_sum(softcap * tanh if softcap > 0 else tanh, targets[chunk])
                grad = torch.autograd.grad(loss, tanh, grad_loss)[0]
            if softcap > 0:  # autograd's TanhBackward0 and DivBackward0 of the cap
                grad = torch.ops.aten.tanh_backward(grad, capped[chunk]) / softcap
            grad_raw[chunk] = grad
        return grad_raw, None, None, None


def chunked_loss_rows(hp: "Hyperparameters", device: torch.device) -> int:
    """Rows per chunk of ChunkedSoftcapCE for this run, or 0 where the eager loss trains: off CPU (bf16 autocast
    there), and with multi-token prediction or distillation (their own loss paths)."""
    plain = hp.mtp_weight == 0 and hp.distill_alpha == 0 and not hp.train_vocab
    return hp.cpu_loss_rows if device.type == "cpu" and plain else 0


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention (torch >= 2.5) trains on CUDA; on CPU torch 2.13 runs its forward only (unfused, no backward)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda"


def attention_backend(hp: Hyperparameters, device: torch.device) -> str:
    """"flex" or "sdpa". auto picks FlexAttention only where it pays: CUDA, torch.compile on (uncompiled flex
    materialises the scores) and a mask that SDPA cannot skip blocks of (windows or document masking); a plain causal
    mask stays on SDPA's FlashAttention kernel."""
    if hp.attention != "auto":
        return hp.attention
    compiled = hp.compile == "on" or (hp.compile == "auto" and device.type == "cuda")
    masked = bool(hp.window_pattern) or hp.doc_mask
    return "flex" if compiled and masked and flex_attention_available(device) else "sdpa"


def document_ids(idx: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) document index within each row: it steps up at every <|endoftext|>."""
    return (idx == bos_id).cumsum(dim=1)


def attention_mask_dense(time_steps: int, window: int, documents: torch.Tensor | None,
                         device: torch.device) -> torch.Tensor:
    """The SDPA reference mask, True where attention is allowed: causal, within `window` tokens, and (documents
    (B, T) given) within the same document. (T, T), or (B, 1, T, T) with documents."""
    distance = torch.arange(time_steps, device=device)[:, None] - torch.arange(time_steps, device=device)[None, :]
    allowed = (distance >= 0) & (distance < window)
    if documents is None:
        return allowed
    same_document = documents[:, :, None] == documents[:, None, :]  # (B, T, T)
    return (allowed & same_document).unsqueeze(1)


def flex_block_mask(time_steps: int, window: int, documents: torch.Tensor | None, device: torch.device):
    """The same mask as attention_mask_dense, as a FlexAttention BlockMask: 128 x 128 blocks that the mask empties
    are skipped entirely (how modded-nanogpt's sliding windows and document masks cost less than dense attention)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        allowed = (query >= key) & (query - key < window)
        if documents is not None:
            allowed = allowed & (documents[batch, query] == documents[batch, key])
        return allowed

    batch = documents.size(0) if documents is not None else None
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=time_steps, KV_LEN=time_steps, device=device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None = None) -> torch.Tensor:
    """(B, H, T, D) attention by whichever path the mask names: None -> SDPA causal (FlashAttention on GPU), a
    boolean tensor -> SDPA with that mask (the reference), a BlockMask -> FlexAttention. scale: the softmax scale
    (None: D^-0.5)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=mask, scale=scale)


def _symmetric_gram_kernel(a_ptr, out_ptr, add_ptr, tiles_ptr, rows, stride_ar, stride_ac, stride_or, stride_oc,
                           alpha, beta, cols: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """out = alpha * A A^T (+ beta * add) for A (rows, cols): A A^T is symmetric, so only the tiles on and above the
    diagonal are computed (program p -> tile (i, j), i <= j), each off-diagonal tile is also stored transposed and
    each diagonal tile is symmetrised, so the output is exactly symmetric. Half the products of a plain matmul, the trick modded-nanogpt's Muon kernels use. `add` must be symmetric too."""
    pid = tl.program_id(0)
    i = tl.load(tiles_ptr + 2 * pid)  # this program's tile (i, j), listed by the host
    j = tl.load(tiles_ptr + 2 * pid + 1)
    offs_i = i * BLOCK + tl.arange(0, BLOCK)
    offs_j = j * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, cols, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        a_i = tl.load(a_ptr + offs_i[:, None] * stride_ar + offs_k[None, :] * stride_ac,
                      mask=(offs_i[:, None] < rows) & (offs_k[None, :] < cols), other=0.0)
        a_j = tl.load(a_ptr + offs_j[:, None] * stride_ar + offs_k[None, :] * stride_ac,
                      mask=(offs_j[:, None] < rows) & (offs_k[None, :] < cols), other=0.0)
        acc += tl.dot(a_i, tl.trans(a_j), input_precision="ieee")
    acc = acc * alpha
    mask = (offs_i[:, None] < rows) & (offs_j[None, :] < rows)
    if HAS_ADD:
        acc += beta * tl.load(add_ptr + offs_i[:, None] * stride_or + offs_j[None, :] * stride_oc, mask=mask,
                              other=0.0).to(tl.float32)
    # A diagonal tile is a_i a_i^T: symmetric in exact arithmetic, but a dot's summation order may differ between
    # its (r, c) and (c, r) entries (numpy's AVX-512 kernels under the interpreter differ by ~1e-6). Averaging it
    # with its transpose makes the output symmetric bit for bit on any backend (x + y == y + x in IEEE).
    acc = tl.where(i == j, (acc + tl.trans(acc)) * 0.5, acc)
    tl.store(out_ptr + offs_i[:, None] * stride_or + offs_j[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + offs_j[None, :] * stride_or + offs_i[:, None] * stride_oc,  # the mirrored tile
             acc.to(out_ptr.dtype.element_ty), mask=mask & (i != j))


def symmetric_gram_triton(a: torch.Tensor, alpha: float = 1.0, add: torch.Tensor | None = None,
                          beta: float = 0.0, block: int = 64) -> torch.Tensor:
    """alpha * a @ a.T (+ beta * add), a 2-D: the Triton kernel above. Reference: symmetric_gram_torch."""
    rows, cols = a.shape
    out = torch.empty(rows, rows, dtype=a.dtype, device=a.device)
    tiles = upper_triangle_tiles(-(-rows // block), a.device)
    kernel = triton_jit(_symmetric_gram_kernel, os.environ.get("TRITON_INTERPRET") == "1")
    kernel[(tiles.size(0),)](a, out, add if add is not None else out, tiles, rows, a.stride(0), a.stride(1),
                             out.stride(0), out.stride(1), float(alpha), float(beta), cols=cols,
                             HAS_ADD=add is not None, BLOCK=block, BLOCK_K=32)
    return out


@functools.lru_cache(maxsize=64)
def upper_triangle_tiles(tiles: int, device: torch.device) -> torch.Tensor:
    """(n, 2) int32 tile coordinates (i, j), i <= j: one program each (cached per shape and device)."""
    return torch.triu_indices(tiles, tiles).T.contiguous().to(device=device, dtype=torch.int32)


def symmetric_gram_torch(a: torch.Tensor, alpha: float = 1.0, add: torch.Tensor | None = None,
                         beta: float = 0.0, block: int = 0) -> torch.Tensor:
    """The reference: alpha * a @ a.T (+ beta * add) as one plain matmul."""
    gram = alpha * (a @ a.mT)
    return gram if add is None else gram + beta * add


# ----------------------------------------------------------------------------------------------------------------------
# main


def tune_cpu_runtime(keep_freed_memory: bool = True) -> None:
    """Two CPU settings measured on 2 cores (torch 2.13, the tiny preset's 50,304-wide lm_head):
    - denormal floats made one lm_head backward matmul ~40x slower (25 s instead of 0.6 s): flush them to zero;
    - glibc hands every allocation above 32 MB back to the OS when freed, so each 200 MB logits tensor page-faults
      afresh: 205 ms per 256 tokens for forward + backward; raising the mmap and trim thresholds so freed memory is
      reused gave 95 ms."""
    torch.set_flush_denormal(True)
    if not keep_freed_memory:  # --low_memory: the heap keeps fewer freed blocks, and fragments less
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not fresh mmaps
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep freed heap memory for the next step
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv or "--explain" in argv:  # print and exit, building nothing
        try:
            if "--explain" in argv:
                print(explain(parse_args([token for token in argv if token != "--explain"])))
            else:
                after = argv[argv.index("-h" if "-h" in argv else "--help") + 1:]
                print(usage(after[0] if after and not after[0].startswith("-") else ""))  # --help NAME
            return 0
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    dist_info, peer_lost = None, False
    try:
        hp = parse_args(argv)
        dist_info = setup_distributed(hp.device, hp.dist_timeout)
        if dist_info.device.type == "cpu":
            tune_cpu_runtime(keep_freed_memory=not hp.low_memory)
        if hp.plan_only:  # before any data or work: the plan, then exit (2 if it cannot fit)
            check_hyperparameters(hp, hp.plan_world_size or dist_info.world_size)
            check_memory_plan(hp, dist_info)
        elif hp.eval_only:
            score_saved_members(hp, dist_info)
        else:
            train(hp, dist_info, argv)
        return 0
    except RunStopped:
        return 3
    except (ConfigError, DataError) as error:
        if dist_info is None or dist_info.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - only another rank's death is turned into one line; the rest re-raised
        lost = peer_failure(error) if dist_info is not None and dist_info.world_size > 1 else ""
        if not lost:
            raise
        print(f"error: {lost}; rank {dist_info.rank} ends the run (--resume RUN_FOLDER on every node "
              f"continues it)", file=sys.stderr, flush=True)
        peer_lost = True
        return 2
    finally:
        stop_heartbeat_watchdog()
        release_run_locks()
        if peer_lost:
            # The process group is broken: tearing it down (or leaving it to the interpreter's exit) can abort inside
            # gloo's threads ("terminate called without an active exception", status -6, seen under load), so this
            # rank ends here, as the watchdog's do (the logs are flushed line by line)
            sys.stdout.flush()
            os._exit(2)
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------------
# Harness: placement, checkpoints and resume, memory plan, locks, watchdog, progress, run outputs.
# Nothing below changes a number.


# --- Run settings: where and how a run goes; none of them changes a number ---


@dataclass
class Hyperparameters(Recipe):
    """A run's Recipe plus its run settings: the whole command line (`--help` maps every flag). The recipe's
    functions take this (hp); none reads a run setting to decide a number."""

    # --- where it runs --------------------------------------------------------------------------------------------
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    dist_timeout: Positive = 600.0  # seconds a rank may stop answering the heartbeat watchdog before every rank ends with one line naming it; collectives time out at twice this, a backstop (torch's default: 30 min)
    parallel_members: PositiveInt = 1  # M process groups of world/M ranks train M members at once (round by round); with
    # distillation the teacher is then the last member of the previous round
    # --- memory plan and placement of frozen models ---------------------------------------------------------------
    plan_only: bool = False  # print the memory plan (what each rank holds, from the configuration alone) and exit
    plan_world_size: Count = 0  # ranks to plan for with --plan_only on a machine without them (0 = this run's world size)
    memory_budget_gb: NonNegative = 0.0  # device memory per rank in GiB to plan against (0 = what CUDA reports; CPU: no check)
    host_memory_gb: NonNegative = 0.0  # RAM per node in GiB to plan host memory against (0 = this machine's; --plan_only: no host check unless stated)
    low_memory: bool = False  # CPU: leave glibc's allocator as it is (fewer freed blocks kept; steps slower, each
    # freed 200 MB lm_head output page-faults afresh; see tune_cpu_runtime); the results are identical
    averaging_on_host: str = "auto"  # EMA/SWA accumulators in host memory: auto (only when the memory plan says they do not fit on the device) | on | off
    candidates_on_disk: str = "auto"  # finished snapshots and members (not teaching) wait as their members/ files, read back one at a time to score them (the public unlimited script's way): auto (only when the memory plan says host memory cannot hold them, see host_memory_gb) | on | off (in host memory)
    frozen_shards: bool = True  # world > 1: each frozen model's host copy split over the ranks (1/n each; a member's group while it teaches under parallel_members), all-gathered onto the device for each use; the same numbers bit for bit (a test checks) | false: every rank keeps every frozen model whole
    # --- run folder, logging, checkpoints -------------------------------------------------------------------------
    run_id: str = ""  # folder name under log_dir ("" = date-time plus a random suffix)
    log_dir: str = "logs"  # where run folders go
    log_every: PositiveInt = 10  # optimizer steps between progress lines (the first and the last step always log)
    checkpoint_every: Interval = 0  # steps between checkpoints of the member in progress (0 = each epoch end; -1 = never)
    save_model: bool = True  # write the final model to <run folder>/model.pt (member format: --eval_only takes it).
    # On by default: a run's weights are its only product that --eval_only and sampling can reuse, and re-training
    # costs far more than the disk (4 bytes per parameter: 53 MB for tiny); --save_model false for sweeps
    wandb: str = ""  # also send every metrics row to this Weights & Biases project (needs `pip install wandb`; "" = off)
    resume: str = ""  # a run folder to continue: finished members are loaded, the member in progress resumes
    eval_only: str = ""  # comma-separated member .pt files or globs: score their ensemble on val (and test), no training
    stop_at_step: Count = 0  # end the process after this step of the member in progress, as if killed (resume tests)


# --- A run's start and end: checks, data, the run folder and its header; the result, model.pt, result.json ---


@dataclass
class RunStart:
    """What start_run hands train: the resolved hyperparameters, the data, the open run folder and the figures the
    result keeps; or, for a run killed after its result.json, that result (only the end was left to write)."""

    hp: Hyperparameters
    data: "RunData | None" = None
    folder: str = ""
    run_id: str = ""
    log: "RunLog | None" = None
    unigram: float = 0.0
    unigram_oracle: float = 0.0
    n_params: int = 0
    result: dict | None = None


def start_run(hp: Hyperparameters, dist_info: Dist, argv: list[str]) -> RunStart:
    """Everything before the first member: a --resume's saved hyperparameters, the checks and the memory plan (a run
    that cannot fit or has bad data stops before it makes a run folder), the data, the run folder (made and locked,
    or reopened), and the log's run section."""
    RUN_CLOCK.update(start=time.time(), before=0.0)
    if hp.resume:
        hp = resumed_hyperparameters(hp, argv)
        if dist_info.from_first_rank(os.path.isfile(os.path.join(hp.resume, "result.json"))):
            return RunStart(hp, result=finish_run_end(hp, dist_info, argv))  # killed after result.json
    check_hyperparameters(hp, dist_info.world_size)
    check_run_id(hp, argv)
    if hp.distill_from:
        check_distill_from(hp)
    plan_lines = check_memory_plan(hp, dist_info)  # refuses a run that cannot fit before any work
    hp = resolve_averaging_on_host(hp, dist_info)
    hp = resolve_candidates_on_disk(hp, dist_info)
    wandb = import_wandb(hp.wandb)  # --wandb without the package stops here, before the run folder exists
    data = load_run_data(hp)  # a bad file stops the run before it makes a run folder
    if hp.val_public_windows:  # the whole val file, as the public records read it (not cut by val_tokens)
        data.public_data = PublicWindows(load_tokens(hp.val_files, hp.vocab_size, "validation"), hp.seq_len,
                                         hp.val_files, hp.val_public_windows, hp.val_window_seed)
        data.token_bytes = token_byte_lengths(hp.tokenizer, hp.vocab_size, hp.bpe_file)  # the run's own tokens

    run_id = dist_info.from_first_rank(hp.run_id or default_run_id())  # one folder for all ranks
    folder = os.path.join(hp.log_dir, run_id)
    if dist_info.from_first_rank(os.path.exists(folder) and not hp.resume):  # every rank stops, none hangs
        raise ConfigError(f"{folder} already exists: choose another --run_id (or continue it with --resume {folder})")
    if hp.resume:
        check_resume_checkpoints(hp, dist_info, folder)
        check_resume_data(folder, data, dist_info)
    log = open_run_folder(hp, dist_info, folder, argv)
    if not hp.resume and dist_info.is_main:  # rank 0 alone writes it: the checksums once, not on every rank
        log.save_json(DATA_FINGERPRINTS, data_fingerprints(data))  # what a --resume must read again
    if wandb is not None and dist_info.is_main:
        log.tracker = wandb.init(project=hp.wandb, name=run_id, config=dataclasses.asdict(hp), dir=folder)
    if hp.resume and dist_info.is_main:
        merge_group_logs(folder)  # the other groups' lines of the interrupted round
        end_cut_line(os.path.join(folder, "metrics.jsonl"))
    run = RunStart(hp, data, folder, run_id, log, unigram_loss(data.train_tokens, data.val_tokens, hp.vocab_size),
                   unigram_entropy(data.val_tokens), sum(p.numel() for p in build_model_meta(hp).parameters()))
    write_run_section(run, dist_info, plan_lines)
    return run


def write_run_section(run: RunStart, dist_info: Dist, plan_lines: list[str]) -> None:
    """The log's run section: the model, the record it reproduces, the data, the batch, val and test, the memory
    plan, data-size warnings, whether val is the public records' tokens."""
    hp, data, log = run.hp, run.data, run.log
    batch_seqs = hp.batch_tokens // hp.seq_len
    accumulation = batch_seqs // (hp.device_batch_size * dist_info.world_size // hp.parallel_members)
    log.section("run", [
        f"model: {run.n_params:,} parameters per member | ensemble of {hp.ensemble_size}"
        + (f" ({hp.ensemble_mode} averaging)" if hp.ensemble_size > 1 else ""),
        *preset_record_lines(hp, run.n_params),
        f"train: {data.train_tokens.size:,} tokens, {document_starts(data.train_tokens, hp.bos_id).size:,} documents",
        f"batch: {batch_seqs} sequences x {hp.seq_len} tokens = {hp.batch_tokens:,} tokens/step "
        f"= {hp.device_batch_size} per rank x {dist_info.world_size // hp.parallel_members} ranks x {accumulation} "
        f"accumulation" + (f" | {hp.parallel_members} members at once" if hp.parallel_members > 1 else "")
        + (f" | batch_schedule x{hp.batch_schedule} (per epoch, the last repeating)" if hp.batch_schedule else ""),
        f"val: {data.val_data.num_targets:,} targets in {data.val_data.num_windows} windows | unigram baseline "
        f"{run.unigram:.4f} (train's token frequencies scored on val) | val's own unigram entropy "
        f"{run.unigram_oracle:.4f} (oracle bound for context-free models)" +
        (f" | test: {data.test_data.num_targets:,} targets" if data.test_data else ""),
    ])
    for line in plan_lines:  # the memory plan (check_memory_plan), in the run section
        log.write(f"memory | {line}")
    for warning in data_size_warnings(hp, data.train_tokens.size) + unused_settings(hp):
        log.write(warning)
    log.write(f"data | {public_val_status(hp)}")  # a record run on other val tokens is visible at a glance


def unused_settings(hp: Hyperparameters) -> list[str]:
    """Log lines for settings this run does not use, so that none is ignored silently: a preset's one-model
    weighting of its epoch snapshots (the 1h record's) under an ensemble, whose candidates mix uniformly."""
    if hp.epoch_snapshot_weights != "equal" and hp.ensemble_size > 1:
        return [f"note | epoch_snapshot_weights {hp.epoch_snapshot_weights} weighs one model's epoch snapshots: this "
                f"ensemble's {candidate_count(hp)} candidates mix uniformly (or by --ensemble_weights)"]
    return []


def finish_run(run: RunStart, dist_info: Dist, pool: "CandidatePool", final: tuple[list, list[float]],
               averages: dict, val_loss: float, test_loss: float | None, ensemble_losses: list[float],
               selection: dict | None) -> dict:
    """After the test pass: the ensemble-size table, model.pt (a single model), bits per byte, the public figure
    (the leaderboard's way of scoring), text samples, result.json, then end_run (the last checkpoint goes, the loss
    plot, the done line). Returns the result."""
    hp, data, log, folder, outcomes = run.hp, run.data, run.log, run.folder, pool.outcomes
    if ensemble_losses:
        log.section("ensemble size -> val loss", [f"{k + 1:>3} members | {loss:.4f} | member {k} alone "
                                                  f"{outcomes[k]['val_loss']:.4f}"
                                                  for k, loss in enumerate(ensemble_losses)])
    if hp.save_model and hp.ensemble_size == 1:  # every rank: a model split over the ranks is gathered by them all
        with frozen_on_device(pool.members[0], dist_info):
            if dist_info.is_main:  # the member format (weights, GPTConfig, schedule state): --eval_only takes it as is
                save_candidate(os.path.join(folder, "model.pt"), pool.members[0], member=0, seed=member_seed(hp, 0),
                               outcome=outcomes[0], tokenizer=hp.tokenizer)
    tokens_seen = sum(r["tokens_seen"] for r in outcomes)
    bpb = run_bits_per_byte(hp, data, val_loss, test_loss, run.unigram)
    log.metrics(dict(kind="bits_per_byte", step=sum(r["steps"] for r in outcomes), tokens_seen=tokens_seen,
                     val_loss=val_loss, **bpb))  # step, tokens_seen and the loss it converts, as every row has them
    result = dict(
        run_id=run.run_id, val_loss=val_loss, test_loss=test_loss, train_loss=outcomes[-1]["train_loss"],
        unigram_val_loss=run.unigram, unigram_val_entropy=run.unigram_oracle, tokens_seen=tokens_seen,
        # the data budget: trained on, plus the fitness slice carved from it (records divide by this)
        train_tokens=int(data.train_tokens.size + (data.fitness_data.tokens.size if data.fitness_data else 0)),
        epochs=outcomes[-1]["epochs"],
        steps=sum(r["steps"] for r in outcomes), parameters=run.n_params,
        wall_seconds=round(run_wall_seconds(), 2),  # earlier sessions' too, after a --resume
        train_seconds=round(sum(r["train_seconds"] for r in outcomes), 2),
        world_size=dist_info.world_size, device=str(dist_info.device), ranks_agree=all(r["agree"] for r in outcomes),
        torch=torch.__version__, git_commit=git_commit(), hyperparameters=dataclasses.asdict(hp),
        member_val_losses=[r["val_loss"] for r in outcomes], ensemble_val_losses=ensemble_losses,
        candidate_val_losses=pool.candidate_losses,
        weight_candidates=[row for r in outcomes for row in r.get("weight_candidates", [])],
        selection=selection, **bpb,
    )
    if data.public_data is not None:
        if data.fitness_data is not None:
            averages = {"selected ensemble": final}
        single = hp.ensemble_size == 1
        epoch_rows = outcomes[0].get("public_evals", []) if single else []
        scored = [dict(label=row["label"], rule=row["rule"], val_loss=row["val_loss_public"],
                       val_bpb=row["val_bpb_public"]) for row in outcomes[0].get("weight_candidates", [])
                  if single and "val_loss_public" in row]
        result["public"] = public_figure_rows(hp, dist_info, data, epoch_rows, averages, scored)
        log.write(f"public figure | val_loss_public {result['public']['val_loss_public']:.4f} (bpb "
                  f"{result['public']['val_bpb_public']:.4f}) from {result['public']['chosen']}: min over "
                  f"{len(result['public']['evaluations'])} evaluations on {data.public_data.num_windows} public "
                  f"windows, as the leaderboard reports it | ours: val_loss {val_loss:.4f} on the full val")
    if hp.sample_tokens:  # after the final evaluation; every rank gathers the models (frozen_models_on_device)
        with frozen_models_on_device(final[0], dist_info):
            if dist_info.is_main:  # no collectives in the sampling itself, so rank 0 alone
                result["samples"] = sample_continuations(*final, hp.ensemble_mode, data.val_tokens, hp,
                                                         dist_info.device)
                log.section(f"samples: {hp.sample_tokens} tokens after val prompts (seed {hp.seed})",
                            sample_lines(result["samples"], hp.vocab_size, hp.tokenizer, hp.bpe_file))
    result["peak_memory_bytes"] = peak_memory_bytes(dist_info.device)
    if hp.resume and dist_info.is_main:
        drop_replayed_metrics(os.path.join(folder, "metrics.jsonl"))
    log.save_json("result.json", result)
    end_run(hp, dist_info, log, folder, result)  # the last checkpoint goes, the loss plot, the done line
    return result


# --- Placement: frozen models in host memory, split over the ranks, or kept as their files ---

# Frozen models off the training device: at the full shape one fp32 model is 7.15 GB, and an 8-member ensemble with
# snapshots kept every finished model on the GPU (review part B.1: out of memory on an 80 GB card). They wait in host
# memory (pinned on CUDA, so the copy to the GPU is a fast DMA) and come to the device one at a time for a use.

FROZEN_ON_DEVICE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # frozen models in use on the training device now


def park_on_host(model: nn.Module, dist_info: Dist) -> nn.Module:
    """Moves a frozen model's weights and buffers to host memory (pinned on CUDA) and marks it parked; returns it.
    On world_size > 1 ranks each keeps only its 1/world_size of them (shard_on_host; see frozen_store)."""
    if dist_info.world_size > 1:
        return shard_on_host(model, dist_info)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            host = tensor.data.to(dist_info.host)
            if dist_info.device.type == "cuda" and not host.is_pinned():
                host = host.pin_memory()
            tensor.data = host
    model.parked_on_host = True
    FROZEN_ON_DEVICE.discard(model)
    return model


def frozen_host_copy(model: GPT, dist_info: Dist) -> GPT:
    """A frozen, parked copy of a model made directly in host memory (a meta-device skeleton filled from the model's
    weights and buffers: no second copy on the device, no random draws), in the model's schedule state."""
    with torch.device("meta"):
        frozen = GPT(model.config)
    if dist_info.world_size > 1:  # each rank copies only its shard: no whole host copy on any rank
        frozen = frozen._apply(lambda tensor: torch.empty(0, dtype=tensor.dtype))  # meta -> empty host tensors
        copy_schedule_state(frozen, model)
        return shard_on_host(frozen.for_inference(), dist_info, sources=[*model.parameters(), *model.buffers()])
    frozen = frozen.to_empty(device=dist_info.host)
    with torch.no_grad():
        for mine, theirs in zip([*frozen.parameters(), *frozen.buffers()], [*model.parameters(), *model.buffers()]):
            mine.copy_(theirs)
    copy_schedule_state(frozen, model)
    return park_on_host(frozen.for_inference(), dist_info)


def copy_schedule_state(frozen: GPT, model: GPT) -> None:
    """The schedule state a frozen copy runs in, as the model's: looped layers, windows, recurrence passes, and the
    window schedule's stage with its YaRN softmax scale (the RoPE tables are buffers: copied with the weights)."""
    frozen.loop_active, frozen.window_sizes = model.loop_active, model.window_sizes
    frozen.recurrence_active = model.recurrence_active
    if model.config.window_schedule:
        frozen.window_stage, frozen.yarn_growths = model.window_stage, list(getattr(model, "yarn_growths", []))
        for mine, theirs in zip(frozen.modules(), model.modules()):
            if isinstance(theirs, CausalSelfAttention):
                mine.softmax_scale = theirs.softmax_scale


@contextmanager
def frozen_on_device(model: nn.Module, dist_info: Dist):
    """with frozen_on_device(model, dist_info): a parked frozen model's weights are on the training device inside,
    back in host memory (the unchanged pinned copy: no copy back) after. A model already in use stays where it is."""
    if not getattr(model, "parked_on_host", False) or model in FROZEN_ON_DEVICE:
        yield model
        return
    if hasattr(model, "candidate_file"):  # kept as its file: read (and broadcast) onto the device for this use
        with file_candidate_on_device(model, dist_info):
            yield model
        return
    if hasattr(model, "frozen_shards"):  # split over ranks: every rank of its group gathers it here, at the same time
        with gathered_on_device(model, dist_info.device):
            yield model
        return
    tensors = [*model.parameters(), *model.buffers()]
    host = [tensor.data for tensor in tensors]
    with torch.no_grad():
        for tensor, data in zip(tensors, host):
            tensor.data = data.to(dist_info.device, non_blocking=True)
    FROZEN_ON_DEVICE.add(model)
    try:
        yield model
    finally:
        for tensor, data in zip(tensors, host):
            tensor.data = data
        FROZEN_ON_DEVICE.discard(model)


# Frozen models sharded over ranks: with every rank holding every frozen model, 8 members with 3 epoch snapshots
# each at the 1h shape took 1 TB of pinned host memory per 8-GPU node. Each rank keeps 1/n of each tensor instead
# (ZeRO-3's partitioning of parameters, Rajbhandari et al. 2020, applied to models that no longer train) and the n
# ranks all-gather a model onto the device when it is used, one model at a time as before. The gathered weights are
# the original bits, so every number is unchanged; the cost is one all-gather of the model per use.


def frozen_store(hp: Hyperparameters, dist_info: Dist) -> Dist:
    """The ranks a frozen model is split over: those of dist_info, or with --frozen_shards false this rank alone.
    Every rank of them must take part in each use (the gather): train() splits over the whole world, where every
    rank scores every candidate in the same order, but under --parallel_members a member that teaches later rounds
    over its group's ranks (each group its own copy) while it teaches: a group gathers its teachers at every
    micro-step while the other groups train other members."""
    if hp.frozen_shards or dist_info.world_size == 1:
        return dist_info
    return dataclasses.replace(dist_info, rank=0, world_size=1, group=None, first_global_rank=0)


def shard_sizes(tensors: list[torch.Tensor], ranks: int) -> list[int]:
    """Elements of each tensor that one rank keeps: ceil(numel / ranks) (the last rank's slice padded with zeros)."""
    return [-(-tensor.numel() // ranks) for tensor in tensors]


def frozen_host_bytes(model: nn.Module, ranks: int) -> int:
    """Bytes of host memory one rank holds for a frozen model split over `ranks` ranks (1: the whole model)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(size * tensor.element_size() for size, tensor in zip(shard_sizes(tensors, ranks), tensors))


def power_of_two_buffers(total: int, dtype: torch.dtype, pinned: bool) -> list[tuple[int, torch.Tensor]]:
    """(first element, buffer) pairs holding `total` elements in buffers of 2^k elements, one per set bit of total:
    torch's pinned-memory allocator rounds every allocation up to a power of two bytes (CachingHostAllocator), so one
    buffer of a 0.67 GiB share would pin 1 GiB."""
    buffers, first = [], 0
    for bit in reversed(range(total.bit_length())):
        if total >> bit & 1:
            buffers.append((first, torch.zeros(1 << bit, dtype=dtype, pin_memory=pinned)))
            first += 1 << bit
    return buffers


def buffer_pieces(buffers: list[tuple[int, torch.Tensor]], begin: int, end: int):
    """(view of a buffer, its position from begin) for the elements begin..end of power_of_two_buffers."""
    for first, buffer in buffers:
        low, high = max(begin, first), min(end, first + buffer.numel())
        if low < high:
            yield buffer[low - first:high - first], low - begin


def shard_on_host(model: nn.Module, shard_dist: Dist, sources: list[torch.Tensor] | None = None) -> nn.Module:
    """Parks a frozen model with this rank's slice of each tensor (of its own, or of `sources`, the same tensors of
    another model: frozen_host_copy) in host buffers per dtype (power_of_two_buffers; pinned on CUDA); the tensors
    themselves become empty until gathered_on_device. Returns the model, marked parked."""
    tensors = [*model.parameters(), *model.buffers()]
    sources = tensors if sources is None else sources
    ranks, rank = shard_dist.world_size, shard_dist.rank
    layout, totals = [], {}
    for tensor, source, size in zip(tensors, sources, shard_sizes(sources, ranks)):
        layout.append((tensor, totals.get(tensor.dtype, 0), size, source.shape))
        totals[tensor.dtype] = totals.get(tensor.dtype, 0) + size
    pinned = shard_dist.device.type == "cuda"
    host = {dtype: power_of_two_buffers(total, dtype, pinned) for dtype, total in totals.items()}
    with torch.no_grad():
        for (tensor, offset, size, _), source in zip(layout, sources):
            mine = source.detach().reshape(-1)[rank * size:(rank + 1) * size]
            for piece, at in buffer_pieces(host[tensor.dtype], offset, offset + mine.numel()):
                piece.copy_(mine[at:at + piece.numel()])
        for tensor, *_ in layout:  # empty: a use outside gathered_on_device fails loudly instead of reading zeros
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    model.frozen_shards = dict(group=shard_dist.group, ranks=ranks, host=host, layout=layout)
    model.parked_on_host = True
    FROZEN_ON_DEVICE.discard(model)
    return model


# all_gather_into_tensor, renamed all_gather_single in newer torch (where the old name warns on every call)
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


@contextmanager
def gathered_on_device(model: nn.Module, device: torch.device):
    """with gathered_on_device(model, device): a sharded frozen model whole on the device (every rank of its group
    all-gathers each tensor into a fresh device buffer, the same bits as before it was split), empty again after."""
    shards = model.frozen_shards
    try:
        with torch.no_grad():
            for tensor, offset, size, shape in shards["layout"]:
                whole = torch.empty(shards["ranks"] * size, dtype=tensor.dtype, device=device)
                mine = torch.empty(size, dtype=tensor.dtype, device=device)
                for piece, at in buffer_pieces(shards["host"][tensor.dtype], offset, offset + size):
                    mine[at:at + piece.numel()].copy_(piece, non_blocking=True)
                all_gather_single(whole, mine, group=shards["group"])
                tensor.data = whole[:shape.numel()].view(shape)
        FROZEN_ON_DEVICE.add(model)
        yield model
    finally:
        for tensor, *_ in shards["layout"]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
        FROZEN_ON_DEVICE.discard(model)


def reshard_on_host(model: nn.Module, dist_info: Dist, store: Dist) -> nn.Module:
    """A parked frozen model split over `store`'s ranks instead (a member's group -> the whole world, once no group
    needs it alone any more): gathered where it is now (every rank of its present group at once; a whole model needs
    no gather), then each rank keeps its slice of the new split. Returns the model."""
    shards = getattr(model, "frozen_shards", None)
    if shards is not None and shards["ranks"] == store.world_size and shards["group"] is store.group:
        return model
    if hasattr(model, "candidate_file"):  # kept as its file (candidates_on_disk): nothing in memory to split
        return model
    if store.world_size == 1:
        return model
    if shards is None:  # whole on this rank: it keeps its slice
        return shard_on_host(model, store)
    with frozen_on_device(model, dist_info):
        return shard_on_host(model, store, sources=[t.data for t in (*model.parameters(), *model.buffers())])


@contextmanager
def frozen_models_on_device(models: list[nn.Module], dist_info: Dist):
    """Every model of the list on the device at once (frozen_on_device each; called on every rank, as a sharded
    model's gather needs them all): for uses that mix whole models together (sampling, logit averaging)."""
    with ExitStack() as stack:
        for model in models:
            stack.enter_context(frozen_on_device(model, dist_info))
        yield models


# Candidates on disk: the unlimited preset keeps 480 candidates (5 members x 96 snapshot cycles); in host memory that
# is 3.3 TB per 8-GPU node even split over the ranks. Every candidate already has its file in members/ (save_candidate),
# so a candidate that no longer teaches is kept as that file, as the public unlimited script keeps its snapshots
# (unlimited/train.py writes each one and reads them back one at a time to score and select them). What stays in
# memory is a skeleton: the model object with empty tensors, its schedule state and its RoPE tables (buffers the file
# does not hold; kept as the in-memory copy has them, so a reloaded candidate is the same model bit for bit).
# The file is read by the rank that wrote it (each member's group's first rank), the one rank certain to see it on
# a cluster without a shared filesystem, and sent to the others by torch.distributed.broadcast, tensor by tensor
# straight into device buffers: one whole model on the device at a time, as with the other frozen models.


def candidates_on_disk(hp: Hyperparameters) -> bool:
    """Whether this run keeps its candidates as their files (candidates_on_disk, resolved from auto before the run;
    with one candidate there is no file and nothing to keep)."""
    return hp.candidates_on_disk == "on" and candidate_count(hp) > 1


def file_candidate(model: GPT, path: str, writer: int) -> GPT:
    """A frozen candidate represented by its file `path` (written by global rank `writer`, save_candidate): a skeleton
    of `model` (a meta-device GPT: no weights made) in its schedule state and inference mode, whose tensors are empty
    except the buffers the file does not hold (the RoPE tables, copied to host memory); frozen_on_device brings it
    whole onto the device from the file (file_candidate_on_device). model: a whole model, read, not kept."""
    global_rank = dist.get_rank() if dist.is_initialized() else 0
    if global_rank == writer and not os.path.isfile(path):
        raise ConfigError(f"{path}: a candidate kept on disk has no file (candidates_on_disk)")
    with torch.device("meta"):
        skeleton = GPT(model.config)
    skeleton = skeleton._apply(lambda tensor: torch.empty(0, dtype=tensor.dtype))  # meta -> empty host tensors
    copy_schedule_state(skeleton, model)
    skeleton.for_inference()
    in_file = set(model.state_dict())
    named = [*model.named_parameters(), *model.named_buffers()]
    layout = []
    with torch.no_grad():
        for (name, tensor), (source_name, source) in zip([*skeleton.named_parameters(), *skeleton.named_buffers()],
                                                         named):
            assert name == source_name, (name, source_name)
            if name in in_file:  # read from the file for each use
                tensor.data = torch.empty(0, dtype=source.dtype)
                layout.append((name, tensor, source.shape))
            else:  # not in the file: a host copy of the model's own (cloned: the training model changes its own later)
                tensor.data = source.detach().to("cpu", copy=True)
    skeleton.candidate_file = dict(path=path, writer=writer, layout=layout)
    skeleton.parked_on_host = True
    return skeleton


def keep_frozen(model: GPT, store: Dist, on_disk: bool, path: str, writer: int, teaches: bool,
                copy: bool = False) -> nn.Module:
    """Where a finished frozen model waits (copy: a frozen copy of the training model, frozen_host_copy; else the
    model itself, parked): in host memory as park_on_host keeps it, or with on_disk (candidates_on_disk) as its file
    (file_candidate). One still in use as a teacher (chain distillation's latest snapshot, a member that teaches
    later members) waits in host memory as before, its file-backed twin beside it (on_disk_twin) to take its place
    once it no longer teaches."""
    disk = file_candidate(model, path, writer) if on_disk else None
    if disk is not None and not teaches:
        return disk
    frozen = frozen_host_copy(model, store) if copy else park_on_host(model, store)
    if disk is not None:
        frozen.on_disk = disk
    return frozen


def on_disk_twin(model: nn.Module) -> nn.Module:
    """A frozen model that no longer teaches: its file-backed twin where it has one (keep_frozen), else itself."""
    return getattr(model, "on_disk", model)


@contextmanager
def file_candidate_on_device(model: GPT, dist_info: Dist):
    """with file_candidate_on_device(model, dist_info): a file-backed candidate whole on the device (the writing rank
    reads each tensor from the file, memory-mapped, into a device buffer; with several ranks it broadcasts it to
    the others), empty again after. Every rank of dist_info takes part, as in a sharded model's gather."""
    info = model.candidate_file
    device = dist_info.device
    global_rank = dist.get_rank() if dist.is_initialized() else 0
    reads = dist_info.world_size == 1 or global_rank == info["writer"]
    state = None
    if reads:
        try:
            verify = VERIFIED_FILES.get(info["path"]) != file_stamp(info["path"])  # changed since written or checked
            check_saved_file_once(info["path"])
            state = torch.load(info["path"], map_location="cpu", mmap=True, weights_only=True)["model"]
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is the same one-line complaint
            raise ConfigError(f"{info['path']}: cannot read a candidate kept on disk ({type(exc).__name__}: {exc})") \
                from None
        if verify:  # its values too, once
            check_finite_state(state, info["path"])
    kept = [(tensor, tensor.data) for tensor in (*model.parameters(), *model.buffers()) if tensor.numel()]
    try:
        with torch.no_grad():
            for name, tensor, shape in info["layout"]:
                whole = torch.empty(shape, dtype=tensor.dtype, device=device)
                if state is not None:
                    if name not in state or state[name].shape != shape:
                        raise ConfigError(f"{info['path']}: {name} is not the candidate's tensor of shape "
                                          f"{tuple(shape)} (candidates_on_disk)")
                    whole.copy_(state[name])
                if dist_info.world_size > 1:
                    dist.broadcast(whole, src=info["writer"], group=dist_info.group)
                tensor.data = whole
            for tensor, host in kept:
                tensor.data = host.to(device, non_blocking=True)
        del state
        FROZEN_ON_DEVICE.add(model)
        yield model
    finally:
        for _, tensor, _ in info["layout"]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
        for tensor, host in kept:
            tensor.data = host
        FROZEN_ON_DEVICE.discard(model)


class TeacherHead:
    """A streamed teacher's lm_head, kept on the device while its body waits on the host: with several teachers
    (distill_teacher ensemble) each body comes to the device in turn for its features, and the teacher logits are
    then made chunk by chunk from those features (teacher_rows) by these heads (vocab x width each)."""
    head = GPT.head

    def __init__(self, teacher: GPT, device: torch.device):
        self.lm_head = copy.deepcopy(teacher.lm_head).to(device)
        self.logit_softcap = teacher.logit_softcap
        # what GPT.head reads besides the weights: the teacher's mode and its vocabulary slices (train_vocab/eval_vocab)
        self.training, self.train_vocab, self.eval_vocab = teacher.training, teacher.train_vocab, teacher.eval_vocab


class CandidatePool:
    """Where a run's finished models live while the ensemble grows, behind one object: the members (each member's
    final model, the distillation teachers), the candidates (what the ensemble averages: the members and, with
    snapshot_cycles or epoch_snapshots, their snapshots) and each one's val loss and outcome. Frozen models wait in
    host memory split over the ranks (frozen_store), come to the device only while in use, or stay as their files
    (candidates_on_disk). The members are trained in rounds, one per group of ranks (parallel_members); a member
    finished before a --resume, or trained by another group, is loaded from its member file instead."""

    def __init__(self, hp: Hyperparameters, dist_info: Dist, folder: str, log: RunLog):
        self.hp, self.dist_info, self.folder, self.log = hp, dist_info, folder, log
        self.group, self.group_index = split_world(dist_info, hp.parallel_members)
        self.keep_files = candidate_count(hp) > 1  # members/ holds every candidate when there is more than one
        self.members, self.outcomes, self.candidates, self.candidate_losses = [], [], [], []
        # frozen models are split over the whole world, except members that a group will still use alone as
        # teachers: those over their group's ranks until the last member is trained (each group keeps its own copy)
        self.world_store = frozen_store(hp, dist_info)
        self.group_log, self.done_before, self.trained_here = log, set(), {}
        # distill_from: a finished run's members, each group's own copy over its ranks (the groups teach at their own
        # pace), loaded one at a time into host memory
        self.outside_teachers = [keep_frozen(load_member(path, dist_info.host)[0], frozen_store(hp, self.group),
                                             False, path, 0, teaches=True)
                                 for path in distill_from_files(hp.distill_from)] if hp.distill_from else []

    def rounds(self):
        """Each round's members (one per group), once every rank has looked for the ones finished before a resume
        (no group writes this round's member files before); group 0 writes its member's lines into log.txt, another
        group into files of its own (group_log_names)."""
        hp = self.hp
        for start in range(0, hp.ensemble_size, hp.parallel_members):
            members = range(start, min(hp.ensemble_size, start + hp.parallel_members))
            self.done_before = {m for m in members if self.keep_files and os.path.isfile(member_path(self.folder, m))}
            self.dist_info.barrier()
            self.trained_here = {}
            self.group_log = self.log if self.group_index == 0 else RunLog(self.folder, self.group.is_main,
                                                                           append=True, group=self.group_index)
            yield members

    def member_to_train(self, members: range) -> int | None:
        """This group's member of the round; None when it has none, or it was finished before (never retrained)."""
        mine = members.start + self.group_index
        return mine if mine in members and mine not in self.done_before else None

    def add_trained(self, member: int, trained: dict) -> None:
        """A member this group just trained: its member file written (when there are several candidates), the
        model frozen (host memory, split; or its file), then its checkpoints removed."""
        model = trained.pop("model").for_inference()
        trained.pop("compiled")
        snapshots = trained.pop("snapshots")
        trained["run_wall_seconds"] = run_wall_seconds()
        if self.keep_files and self.group.is_main:
            save_candidate(member_path(self.folder, member), model, member=member, seed=member_seed(self.hp, member),
                           outcome=trained, tokenizer=self.hp.tokenizer)
        self.trained_here[member] = (self.kept_member(member, model), snapshots, trained)
        self.group.barrier()  # the member file exists before any checkpoint of it goes
        if self.keep_files:  # a single model's last checkpoint is its weights until result.json is written
            remove_checkpoints(self.folder, member, self.group)

    def close_round(self, members: range):
        """Waits for every group's member (groups may finish hours apart), then adds the round's members and their
        snapshots to the candidates in order, yielding each member as it joins."""
        if self.group_log is not self.log:
            self.group_log.close()
        self.dist_info.wait_for_all()  # every member of the round is on disk
        if self.dist_info.is_main and self.hp.parallel_members > 1:
            merge_group_logs(self.folder)
        for member in members:
            if member in self.trained_here:  # its snapshots, split over the group while it trained, now over the world
                model, snapshots, outcome = self.trained_here[member]
                snapshots = [(reshard_on_host(on_disk_twin(snapshot), self.group, self.world_store), loss)
                             for snapshot, loss in snapshots]
            else:  # finished before an interruption, or trained by another group
                model, snapshots, outcome = self.load_finished(member)
                how = "finished before the resume" if member in self.done_before else "trained by another group"
                self.log.write(f"{member_tag(self.hp, member)}loaded {how} from {member_path(self.folder, member)} | "
                               f"val_loss {outcome['val_loss']:.4f}")
            for p in model.parameters():
                p.requires_grad_(False)
            self.members.append(model)
            self.outcomes.append(outcome)
            for candidate, loss in [*snapshots, (model, outcome["val_loss"])]:
                self.candidates.append(candidate)
                self.candidate_losses.append(loss)
            yield member

    def close(self) -> None:
        """Every member trained: none teaches any more, so under candidates_on_disk each is its file from here, and
        the teachers too are split over the world."""
        self.members[:] = [on_disk_twin(m) for m in self.members]
        self.outside_teachers = []  # distill_from's teachers: their memory back
        self.candidates[:] = [on_disk_twin(c) for c in self.candidates]
        for model in self.members:
            reshard_on_host(model, self.group, self.world_store)

    def teaches_later(self, member: int) -> bool:
        """Whether a member teaches members of later rounds (the chain; not distill_from's outside teachers)."""
        hp = self.hp
        round_start = member - member % hp.parallel_members
        return hp.distill_alpha > 0 and not hp.distill_from and round_start + hp.parallel_members < hp.ensemble_size

    def member_store(self, member: int) -> Dist:
        return frozen_store(self.hp, self.group) if self.teaches_later(member) else self.world_store

    def writer(self, member: int) -> int:
        """The global rank that writes the member's files: its group's rank 0."""
        return member % self.hp.parallel_members * (self.dist_info.world_size // self.hp.parallel_members)

    def kept_member(self, member: int, model: GPT) -> nn.Module:
        """The member parked in host memory, or its file under candidates_on_disk."""
        hp = self.hp
        teaches = self.teaches_later(member) and not hp.snapshot_distill_after  # (its snapshots teach instead)
        return keep_frozen(model, self.member_store(member), candidates_on_disk(hp), member_path(self.folder, member),
                           self.writer(member), teaches)

    def load_finished(self, member: int) -> tuple[GPT, list, dict]:
        """A member from its files into host memory (frozen models wait there), each parked as it comes: one whole
        model at a time on a rank."""
        model, saved = load_member(member_path(self.folder, member), self.dist_info.host)
        remove_checkpoints(self.folder, member, self.group)  # a kill between its member file and this left one
        carry_wall_seconds(saved["outcome"].get("run_wall_seconds"))
        model = self.kept_member(member, model)
        snapshots = []
        for cycle in range(saved["outcome"].get("snapshot_count", 0)):
            path = snapshot_path(self.folder, member, cycle)
            snapshot, info = load_member(path, self.dist_info.host)
            snapshots.append((keep_frozen(snapshot, self.world_store, candidates_on_disk(self.hp), path,
                                          self.writer(member), teaches=False), info["outcome"]["val_loss"]))
        return model, snapshots, saved["outcome"]


# --- Member files, checkpoints and resume ---


def distill_from_files(folder: str) -> list[str]:
    """--distill_from's teachers: a finished run's member files (members/member_NN.pt, its snapshots left out), or
    the model.pt of a run of one model."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--distill_from {folder}: no such run folder")
    members = os.path.join(folder, "members")
    names = sorted(n for n in os.listdir(members) if re.fullmatch(r"member_\d+\.pt", n)) \
        if os.path.isdir(members) else []
    paths = [os.path.join(members, n) for n in names] or \
        [p for p in [os.path.join(folder, "model.pt")] if os.path.isfile(p)]
    if not paths:
        raise ConfigError(f"--distill_from {folder}: neither members/member_NN.pt nor model.pt there (a finished run "
                          f"folder; a single model's run writes model.pt with --save_model)")
    return paths


def check_distill_from(hp: Hyperparameters) -> None:
    """--distill_from's teachers read their targets from the run's tokens: each file is checked (checksums, numbers)
    and must predict this run's vocabulary, made by this run's tokenizer; refused before the run folder exists."""
    for path in distill_from_files(hp.distill_from):
        check_saved_file_once(path)
        try:
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            vocab, tokenizer = saved["config"]["vocab_size"], saved.get("tokenizer", "gpt2")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line complaint
            raise ConfigError(f"--distill_from {path}: not a member file ({type(exc).__name__}: {exc})") from None
        if vocab != hp.vocab_size or tokenizer != hp.tokenizer:
            raise ConfigError(f"--distill_from {path}: its model predicts {vocab} tokens of tokenizer {tokenizer}, "
                              f"this run {hp.vocab_size} of {hp.tokenizer}: a teacher must share the run's tokens")


def default_run_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def check_run_settings(hp: Hyperparameters, world_size: int) -> None:
    """The run settings' checks (check_hyperparameters calls it first): the device, placement, parallel members."""
    require(hp.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {hp.device!r}")
    require(hp.averaging_on_host in ("auto", "on", "off"),
            f"averaging_on_host must be auto, on or off, got {hp.averaging_on_host!r}")
    require(hp.candidates_on_disk in ("auto", "on", "off"),
            f"candidates_on_disk must be auto, on or off, got {hp.candidates_on_disk!r}")
    require(not (hp.stop_at_step and hp.parallel_members > 1), "stop_at_step (a test aid) needs parallel_members 1")
    require(world_size % hp.parallel_members == 0,
            f"parallel_members {hp.parallel_members} must divide the {world_size} ranks")
    # a round whose groups do not all train a member leaves the idle ones at the round's barrier for a whole member,
    # past NCCL's 10-minute watchdog
    require(hp.ensemble_size % hp.parallel_members == 0,
            f"parallel_members {hp.parallel_members} must divide ensemble_size {hp.ensemble_size}: otherwise the last "
            f"round leaves groups idle at a barrier (NCCL times out); change --ensemble_size or --parallel_members")
    require(hp.parallel_members <= hp.ensemble_size,
            f"parallel_members {hp.parallel_members} trains that many members at once: more than ensemble_size "
            f"{hp.ensemble_size} leaves groups idle")


def check_run_id(hp: Hyperparameters, argv: list[str]) -> None:
    """--run_id names one folder inside --log_dir (review b48, b49: '../x' and '/abs/path' put the run outside it):
    one path component, not '.' or '..'; an explicit empty value is refused too (left out, it means a new id)."""
    if hp.resume:
        return  # the folder given to --resume names the run
    given_empty = any(token == "--run_id=" or (token == "--run_id" and index + 1 < len(argv) and argv[index + 1] == "")
                      for index, token in enumerate(argv))
    run_id = hp.run_id
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if given_empty or run_id in (".", "..") or any(sep in run_id for sep in separators) or "\0" in run_id:
        raise ConfigError(f"--run_id {run_id!r} must be one folder name inside --log_dir {hp.log_dir!r}: no "
                          f"'/', not '', '.' or '..'")
    if run_id and (not run_id.isprintable() or not run_id.strip()):  # ("" = a new id) a newline splits log.txt's 'run folder:' line; bytes that
        # are not UTF-8 (surrogates here) cannot be written to log.txt at all; a name of spaces only hides in a listing
        raise ConfigError(f"--run_id {run_id!r} must be a folder name of printable UTF-8 characters (no newline, "
                          f"control character or undecodable byte), not spaces only")


class RunStopped(Exception):
    """--stop_at_step reached: the process ends as if killed, its checkpoint on disk (resume tests)."""


def diverged_line(hp: Hyperparameters, folder: str, member: int, rank: int, what: str, where: str) -> str:
    """The one line of a diverged member (a non-finite train loss, weights or optimizer state): what, at which
    step, where it was seen, and the last good checkpoint, which stays (a non-finite state is never saved)."""
    steps = checkpoint_steps(folder, member, rank)
    kept = (f"its checkpoint of step {steps[0]} stays in {os.path.join(folder, 'checkpoints')}" if steps
            else "no checkpoint of it was written before")
    return (f"{member_tag(hp, member)}training diverged: {what}, found at {where}; {kept} (--resume would repeat the "
            f"same steps: start a new run with other settings)")


def member_path(folder: str, member: int) -> str:
    return os.path.join(folder, "members", f"member_{member:02d}.pt")


def snapshot_path(folder: str, member: int, cycle: int) -> str:
    """A member's snapshot at the end of LR cycle `cycle` (the last cycle's snapshot is the member file itself)."""
    return os.path.join(folder, "members", f"member_{member:02d}_snapshot_{cycle:02d}.pt")


def save_candidate(path: str, model: "GPT", **info) -> None:
    """A member or snapshot with what rebuilds it exactly: weights, the model's GPTConfig, and the schedule state it
    was taken in (looped layers on or off, the window schedule's windows, the recurrence passes in force), so a
    reload scores as the in-memory model."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = dict(loop_active=model.loop_active, window_sizes=model.window_sizes,
                 recurrence_active=model.recurrence_active, window_stage=getattr(model, "window_stage", None))
    atomic_torch_save(dict(model=model.state_dict(), config=dataclasses.asdict(model.config), inference_state=state,
                           **info), path)
    VERIFIED_FILES[path] = file_stamp(path)  # these bytes are the model's own: a file candidate reads them unchecked


# Checksums (issue 25; the review's r12, r13b, mc1: 16 bytes flipped in a tensor loaded silently, NaN or slightly
# wrong numbers, exit 0). torch.save writes a zip in which every record (data.pkl, each tensor storage's bytes)
# carries the CRC-32 of its bytes, in its local header and in the central directory, computed as it writes (torch
# >= 2.6: torch.serialization.set_crc32_options, on by default; older torch always did): the checksum is written with
# the file, in the same atomic rename, and costs no byte and no time at save. torch.load never compares it;
# check_saved_file does, reading every record once more (page cache: ~1.7 GB/s a core). A file without checksums
# (every CRC field 0: written with the option off; or torch's pre-zip format, not a zip at all) still loads as before,
# checked finite only. Every loaded weight and optimizer state is also checked finite (non_finite_entry), so a file
# that faithfully holds a NaN is refused too.

VERIFIED_FILES: dict[str, tuple] = {}  # path -> file_stamp of a file this process wrote or checked (file candidates)


def file_stamp(path: str) -> tuple:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def check_saved_file(path: str, advice: str = "") -> None:
    """Compares every record of a torch.save file with its stored CRC-32; a mismatch (or a zip that cannot be read)
    is one ConfigError naming the file and the record. advice: what to do, appended to the line."""
    import zipfile
    if not zipfile.is_zipfile(path):
        return  # torch's pre-zip format (or not a torch file: torch.load says so): no checksum to compare
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(record.CRC for record in records if record.file_size):
                return  # written with torch's CRC-32 off: no checksum stored
            for record in records:
                with archive.open(record) as handle:  # zipfile compares the CRC-32 at the record's end
                    while handle.read(2**24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        bad_crc = re.match(r"Bad CRC-32 for file '(.*)'", detail)
        what = (f"its record {bad_crc.group(1)} fails its CRC-32 checksum (the bytes changed after they were written)"
                if bad_crc else f"its zip structure cannot be read ({type(exc).__name__}: {detail})")
        raise ConfigError(f"{path} is damaged: {what}{'; ' + advice if advice else ''}") from None


def check_saved_file_once(path: str, advice: str = "") -> None:
    """check_saved_file, skipped for a file this process wrote or checked that has not changed since (its size,
    modification time and inode): a candidate kept on disk is read at every use, and its bytes are its model's own."""
    stamp = file_stamp(path)
    if VERIFIED_FILES.get(path) != stamp:
        check_saved_file(path, advice)
        VERIFIED_FILES[path] = stamp


def non_finite_entry(obj, prefix: str = "") -> str | None:
    """The key path ('model/lm_head.weight') of the first floating-point tensor in obj (nested dicts, lists, tuples)
    holding a NaN or an infinity, else None. Fast path: each tensor's sum, finite exactly when every element is
    (a NaN or an infinity makes the sum NaN or infinite), unless finite values overflow it; one device sync for the
    whole object. Only then is each tensor checked element by element (isfinite: 20x slower on a CPU)."""
    found, pending = [], [(prefix, obj)]
    while pending:
        name, item = pending.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() or item.is_complex():
                found.append((name, item))
        elif isinstance(item, dict):
            pending.extend((f"{name}/{key}" if name else str(key), value) for key, value in reversed(item.items()))
        elif isinstance(item, (list, tuple)):
            pending.extend((f"{name}/{index}" if name else str(index), value)
                           for index, value in reversed(list(enumerate(item))))
    flags = {}
    for _, tensor in found:  # one flag per device
        ok = torch.isfinite(tensor.sum())
        flags[tensor.device] = ok if tensor.device not in flags else flags[tensor.device] & ok
    if all(bool(flag) for flag in flags.values()):
        return None
    return next((name for name, tensor in found if not bool(torch.isfinite(tensor).all())), None)


def check_finite_state(obj, path: str, advice: str = "") -> None:
    """A loaded file's tensors all finite, else one line naming the file and the tensor."""
    name = non_finite_entry(obj)
    if name is not None:
        raise ConfigError(f"{path} holds values that are not finite (NaN or infinity) in {name}"
                          f"{'; ' + advice if advice else ''}")


def member_file_advice(path: str) -> str:
    """What to do with a damaged member file of a run folder: --resume trains a member again when its file is gone."""
    match = re.fullmatch(r"member_(\d+)\.pt", os.path.basename(path))
    in_run = match and os.path.basename(os.path.dirname(os.path.abspath(path))) == "members"
    return f"delete it to train member {int(match.group(1))} again with --resume" if in_run else ""


def load_member(path: str, device: torch.device) -> tuple[GPT, dict]:
    """A saved member (members/member_NN.pt): its model, rebuilt from the GPTConfig stored beside the weights (or,
    in files written before GPTConfig, from all the run's hyperparameters)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such member file")
    check_saved_file_once(path, member_file_advice(path))
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        config = (GPTConfig(**saved["config"]) if "config" in saved
                  else model_config(Hyperparameters(**saved["hyperparameters"])))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line complaint
        raise ConfigError(f"{path}: not a member file ({type(exc).__name__}: {exc})") from None
    check_finite_state(saved["model"], path, member_file_advice(path))
    saved["config"] = dataclasses.asdict(config)
    # what made the shards it was trained on (saved beside the weights; older files: in their hyperparameters, else GPT-2)
    saved.setdefault("tokenizer", saved.get("hyperparameters", {}).get("tokenizer", "gpt2"))
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(saved.pop("model"))  # the weights now live in the model: no second copy per member
    state = saved.get("inference_state", {})  # the schedule state the model was saved in (see save_candidate)
    model.loop_active = state.get("loop_active", bool(config.loop_repeats))
    model.window_sizes = state.get("window_sizes", model.window_sizes)
    model.recurrence_active = state.get("recurrence_active", True)
    if state.get("window_stage") is not None:  # the window schedule's stage: its windows, YaRN tables and scale
        set_window_schedule_stage(model, state["window_stage"])
    return model.for_inference(), saved


def checkpoint_path(folder: str, member: int, rank: int) -> str:
    """The single-file layout of earlier versions (every rank wrote the whole state): read on resume, never written."""
    return os.path.join(folder, "checkpoints", f"member_{member:02d}_rank{rank}.pt")


def checkpoint_files(folder: str, member: int, step: int, rank: int) -> tuple[str, str]:
    """The sharded checkpoint of a member after `step`: (the replicated state, written once by rank 0: weights, AdamW,
    weight averages; this rank's own shard: the momentum of the Muon matrices it owns, its RNG, its loss sum). At full
    scale every rank used to write the whole ~9.6 GB; the step in the names lets a new generation be written beside
    the old, which goes only once every rank has its new shard on disk."""
    stem = os.path.join(folder, "checkpoints", f"member_{member:02d}_step{step:07d}")
    return f"{stem}_shared.pt", f"{stem}_rank{rank}.pt"


def checkpoint_names(folder: str, member: int) -> list[tuple[int, str, str]]:
    """(step, part, path) of every sharded checkpoint file of the member; part is 'shared' or 'rank<r>'."""
    try:
        names = os.listdir(os.path.join(folder, "checkpoints"))
    except FileNotFoundError:
        return []
    prefix, found = f"member_{member:02d}_step", []
    for name in names:
        step, _, part = name[len(prefix):].partition("_")
        if name.startswith(prefix) and name.endswith(".pt") and step.isdigit():
            found.append((int(step), part[:-len(".pt")], os.path.join(folder, "checkpoints", name)))
    return found


def checkpoint_steps(folder: str, member: int, rank: int) -> list[int]:
    """The steps of this member whose shared file and this rank's shard are both on disk, newest first."""
    files = {(step, part) for step, part, _ in checkpoint_names(folder, member)}
    return sorted((step for step, part in files if part == "shared" and (step, f"rank{rank}") in files), reverse=True)


def remove_checkpoints(folder: str, member: int, dist_info: Dist, keep: int | None = None) -> None:
    """Deletes this rank's shards of the member (and, on rank 0, the shared files) of every step but `keep`, and the
    old single-file layout's file: superseded generations, a generation some rank never finished, a saved member."""
    paths = [path for step, part, path in checkpoint_names(folder, member) if step != keep
             and (part == f"rank{dist_info.rank}" or (part == "shared" and dist_info.is_main))]
    for path in paths + [checkpoint_path(folder, member, dist_info.rank)]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def raise_if_any_rank(dist_info: Dist, failure: str | None, elsewhere: str) -> None:
    """A check every rank makes on its own data, failed on some: every rank raises together (none waits at the next
    collective), rank 0 with its own line or, when only others failed, naming the first of them (`rank N: elsewhere`)."""
    failed = torch.zeros(dist_info.world_size, device=dist_info.device)
    failed[dist_info.rank] = float(failure is not None)
    if not dist_info.all_reduce_sum(failed).any():
        return
    first = int(failed.nonzero()[0].item())
    raise ConfigError(failure or f"rank {first}: {elsewhere}")


class MemberCheckpoint:
    """A member's checkpoint and resume, sharded (checkpoint_files): rank 0 writes the replicated state once, each rank
    its own shard; every file written atomically after a free-space check, the bytes logged. The last step is saved
    too, before the final validation, so a kill at any moment loses at most the step in flight."""

    def __init__(self, folder: str, member: int, dist_info: Dist, hp: Hyperparameters, log: RunLog | None = None):
        self.folder, self.member, self.dist_info, self.hp, self.log = folder, member, dist_info, hp, log
        self.every, self.path = hp.checkpoint_every, checkpoint_path(folder, member, dist_info.rank)

    def due_after(self, done: int, schedule: MemberSchedule) -> bool:
        """After each epoch (checkpoint_every 0), every N steps (N > 0) or never (-1), and before a --stop_at_step
        stop; the last step is saved by save_last, before the final validation."""
        every = self.every
        return done < schedule.total_steps and (schedule.stop_after(done) or (schedule.epoch_end(done) and every >= 0)
                                                or (every > 0 and done % every == 0))

    def save(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], progress: dict, averaging: list) -> None:
        dist_info, device, step = self.dist_info, self.dist_info.device, progress["step"]
        shared_path, shard_path = checkpoint_files(self.folder, self.member, step, dist_info.rank)
        sharded = [isinstance(optimizer, Muon) for optimizer in optimizers]  # Muon: each rank its own matrices
        # a diverged state is not written over the last good checkpoint (one sync: the flags of every tensor at once)
        name = non_finite_entry(dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers]))
        raise_if_any_rank(dist_info, name and diverged_line(
            self.hp, self.folder, self.member, dist_info.rank, f"the weights or optimizer state are not finite "
            f"({name}) after step {step}", f"the checkpoint of step {step}"), "its weights or optimizer state are "
            f"not finite after step {step}: training diverged; the last good checkpoint stays")
        sizes, failure = torch.zeros(2, dtype=torch.float64, device=device), None
        try:
            os.makedirs(os.path.dirname(shard_path), exist_ok=True)
            atomic_torch_save(dict(step=step, rank=dist_info.rank, world_size=dist_info.world_size, progress=progress,
                                   optimizers=[o.state_dict() if own else None for o, own in zip(optimizers, sharded)],
                                   rng=torch.get_rng_state(),
                                   cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
                              shard_path)
            sizes[1] = os.path.getsize(shard_path)
            if dist_info.is_main:
                replicated = [None if own else optimizer.state_dict() for optimizer, own in zip(optimizers, sharded)]
                atomic_torch_save(dict(step=step, world_size=dist_info.world_size, progress=progress,
                                       model=model.state_dict(), hyperparameters=dataclasses.asdict(self.hp),
                                       optimizers=replicated,
                                       run_wall_seconds=run_wall_seconds(),
                                       **{kind.key: kind.state() for kind in averaging if kind.key}), shared_path)
                sizes[0] = os.path.getsize(shared_path)
        except (StorageError, OSError) as exc:
            failure = exc if isinstance(exc, StorageError) else StorageError(
                f"{os.path.dirname(shard_path)}: cannot write the checkpoint there ({exc.strerror or exc})")
        failed = torch.tensor([float(failure is not None)], device=device)
        if dist_info.all_reduce_sum(failed).item():  # every rank stops, none waits at the next collective
            for path in [shard_path] + ([shared_path] if dist_info.is_main else []):
                if os.path.exists(path):  # this generation is incomplete: the previous one stays the one to resume
                    os.remove(path)
            raise failure or StorageError(f"{os.path.dirname(shard_path)}: another rank could not write its "
                                          f"checkpoint shard (its error line says why)")
        # the new generation is complete on every rank before any rank drops the previous one
        remove_checkpoints(self.folder, self.member, dist_info, keep=step)
        dist_info.all_reduce_sum(sizes)
        if self.log is not None:
            self.log.write(f"{member_tag(self.hp, self.member)}checkpoint | step {step} | "
                           f"{format_bytes(int(sizes.sum().item()))} on {dist_info.world_size} rank(s): "
                           f"{format_bytes(int(sizes[0].item()))} shared (rank 0) + "
                           f"{format_bytes(int(sizes[1].item() / dist_info.world_size))} per rank shard")

    def find(self) -> int | None:
        """The step every rank can resume from: the newest generation whose shared file and shards are all on disk
        (a kill between two ranks' writes leaves the previous generation complete); None: start afresh."""
        dist_info = self.dist_info
        steps = checkpoint_steps(self.folder, self.member, dist_info.rank)
        newest = torch.tensor([float(steps[0] if steps else -1)], dtype=torch.float64, device=dist_info.device)
        if not steps and os.path.isfile(self.path):  # the single-file layout of earlier versions
            newest[0] = torch.load(self.path, map_location="cpu", weights_only=False, mmap=True)["progress"]["step"]
        if dist_info.world_size > 1:
            dist.all_reduce(newest, op=dist.ReduceOp.MIN, group=dist_info.group)
        step = int(newest.item())
        if step >= 0 and steps and step not in steps:
            raise ConfigError(f"--resume: {os.path.dirname(self.path)} holds no complete checkpoint of step {step} "
                              f"for rank {dist_info.rank}: delete it to restart member {self.member}")
        return step if step >= 0 else None

    def resume(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], progress: dict,
               averaging: list) -> bool:
        """Loads the newest complete checkpoint, if there is one, into the model, optimizers, progress and averages;
        the files of any other generation (an unfinished newer one, a superseded older one) are removed."""
        step = self.find()
        device, world_size = self.dist_info.device, self.dist_info.world_size
        if step is None:
            if self.hp.resume and self.log is not None and self.dist_info.is_main:
                self.say_why_starting_over()
            remove_checkpoints(self.folder, self.member, self.dist_info)
            return False
        if checkpoint_steps(self.folder, self.member, self.dist_info.rank):
            shared_path, self.path = checkpoint_files(self.folder, self.member, step, self.dist_info.rank)
            shared = torch.load(shared_path, map_location=device, weights_only=False)
            shard = torch.load(self.path, map_location=device, weights_only=False)
        else:  # the old single file holds both parts
            shared_path = self.path
            shared = shard = torch.load(self.path, map_location=device, weights_only=False)
        # the checksums were compared before the run folder was touched (check_resume_checkpoints); now the values
        older = [done for done in checkpoint_steps(self.folder, self.member, self.dist_info.rank) if done < step]
        advice = (f"delete it to resume member {self.member} from its checkpoint of step {older[0]}" if older
                  else f"delete it to restart member {self.member} from its start")
        failure = next((f"{path} holds values that are not finite (NaN or infinity) in {name}; {advice}"
                        for path, state in ((shared_path, shared), (self.path, shard))
                        for name in [non_finite_entry(state)] if name is not None), None)
        raise_if_any_rank(self.dist_info, failure, "its checkpoint shard holds values that are not finite")
        if shard.get("world_size", world_size) != world_size:
            raise ConfigError(f"{self.path} was written by {shard['world_size']} ranks per member, this run has "
                              f"{world_size}: resume on the same number of ranks (Muon's momentum is sharded)")
        model.load_state_dict(shared["model"])
        for optimizer, own, common in zip(optimizers, shard["optimizers"], shared["optimizers"]):
            optimizer.load_state_dict(own if own is not None else common)
        progress.update(shard["progress"])
        carry_wall_seconds(shared.get("run_wall_seconds"))
        for kind in averaging:
            kind.restore(dict(shared, progress=shard["progress"]), model)
        # the RNG last: rebuilding snapshots draws initialisations, and the dropout masks from here on must be the
        # uninterrupted run's; RNG states are CPU byte tensors even when map_location moved them to the GPU
        torch.set_rng_state(shard["rng"].cpu())
        if shard.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(shard["cuda_rng"].cpu(), device)
        if "step" in shard:  # the new layout: drop every other generation (the old file stays until the next save)
            remove_checkpoints(self.folder, self.member, self.dist_info, keep=step)
        return True

    def say_why_starting_over(self) -> None:
        """A resumed member with no complete checkpoint trains from step 1 again: one log line says why when it had
        begun before (steps logged in metrics.jsonl, or checkpoint files of it: a kill before its first checkpoint was
        whole, or files deleted since; review r14, r15). Decided: a missing or incomplete checkpoint is started over,
        not refused: training is deterministic, so the run ends as an uninterrupted one, and a kill while the first
        checkpoint is written leaves exactly this; the cost is the steps trained again, which the line counts. A
        damaged checkpoint file (checksum, values, structure) is refused instead (check_resume_checkpoints): it asks
        for a look, and deleting it is the consent to start over."""
        files = checkpoint_names(self.folder, self.member)
        logged = [row.get("step", 0) for row in read_metrics_rows(os.path.join(self.folder, "metrics.jsonl"))
                  if row.get("kind") == "train" and row.get("member", 0) == self.member]
        if not files and not logged:
            return  # a member that had not begun
        if files:
            newest = max(step for step, _, _ in files)
            parts = {part for step, part, _ in files if step == newest}
            missing = [os.path.basename(path) for path in checkpoint_files(self.folder, self.member, newest, 0)
                       if path.rpartition("_")[2][:-len(".pt")] not in parts]
            why = (f"its newest checkpoint, step {newest}, is incomplete ({', '.join(missing) or 'a shard'} is "
                   f"missing)")
        else:
            why = "checkpoints/ holds no file of it"
        again = f"; its steps 1-{max(logged)} logged before are trained again" if logged else ""
        self.log.write(f"{member_tag(self.hp, self.member) or 'the model '}starts over from step 1: {why}{again} "
                       f"(training is deterministic: it ends as it would have)")

    def check_ranks_agree(self, step: int, tag: str) -> None:
        """A crash between two ranks' checkpoint writes would leave them at different steps."""
        steps = torch.tensor([step, -step], dtype=torch.float64, device=self.dist_info.device)
        if self.dist_info.world_size > 1:
            dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.dist_info.group)
            if steps[0].item() != -steps[1].item():
                raise ConfigError(f"{tag}the ranks' checkpoints disagree on the step ({-steps[1].item():.0f} to "
                                  f"{steps[0].item():.0f}): delete {os.path.dirname(self.path)} to restart this "
                                  f"member")


def read_metrics_rows(path: str) -> list[dict]:
    """metrics.jsonl's rows (none when it is missing); a line cut by a kill is skipped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return [row for row in rows if isinstance(row, dict)]


def end_cut_line(path: str) -> None:
    """A kill can cut metrics.jsonl's last row: ending it lets the resumed run's first row start on a line of its own
    (drop_replayed_metrics drops the cut one)."""
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                handle.write(b"\n")


def metrics_row_key(row: dict) -> tuple:
    """What a metrics.jsonl row is about: its kind and where (member, step, snapshot cycle, ensemble size)."""
    return tuple(row.get(name) for name in ("kind", "member", "step", "cycle", "members"))


def drop_replayed_metrics(path: str) -> int:
    """After a --resume: the steps between the last checkpoint and the kill were logged twice (once before the kill,
    once replayed); keeps the replayed row of each, in the order written, and returns how many rows went."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return 0
    keys = []
    for line in lines:
        try:
            keys.append(metrics_row_key(json.loads(line)))
        except ValueError:  # a line cut by the kill: dropped with the rest of the interrupted session's tail
            keys.append(None)
    last = {key: index for index, key in enumerate(keys)}
    kept = [line for index, (line, key) in enumerate(zip(lines, keys)) if key is not None and last[key] == index]
    if len(kept) < len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
    return len(lines) - len(kept)


RESUME_MAY_CHANGE = {"resume", "stop_at_step", "device", "compile", "log_every", "val_batch_size", "preset",
                     "fused_loss", "attention", "plan_only", "memory_budget_gb", "plan_world_size", "dist_timeout",
                     "low_memory", "sample_tokens", "wandb", "candidates_on_disk", "host_memory_gb", "cpu_loss_rows"}


def resumed_hyperparameters(hp: Hyperparameters, argv: list[str]) -> Hyperparameters:
    """--resume FOLDER continues a run with the hyperparameters it was started with; only flags that do not change
    the result (where and how to run) may be given again."""
    allowed = set(RESUME_MAY_CHANGE)
    given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    allowed |= {"train_files", "val_files", "test_files"}  # checked against the saved values below
    if given - allowed:
        raise ConfigError(f"--resume continues {hp.resume} with its own hyperparameters; drop "
                          f"{', '.join('--' + name for name in sorted(given - allowed))}")
    saved_path = os.path.join(hp.resume, "hyperparameters.json")
    if not os.path.isfile(saved_path):
        raise ConfigError(f"--resume {hp.resume}: no hyperparameters.json there (not a run folder?)")
    if os.path.isfile(os.path.join(hp.resume, "result.json")) and run_ended(hp.resume):
        raise ConfigError(f"--resume {hp.resume}: that run finished (result.json is there); nothing to continue")
    saved = saved_hyperparameters(hp.resume, allowed)
    same_data = {name for name in ("train_files", "val_files", "test_files") if name in given
                 and getattr(hp, name) == saved.get(name)}  # run.sh passes them again: fine when unchanged
    if given & {"train_files", "val_files", "test_files"} - same_data:
        raise ConfigError(f"--resume continues {hp.resume} on its own data; "
                          f"{', '.join('--' + n for n in sorted(given & {'train_files', 'val_files', 'test_files'} - same_data))}"
                          f" differs from the run's")
    saved.update({name: getattr(hp, name) for name in given & allowed if name != "preset"})
    saved.update(resume=hp.resume, run_id=os.path.basename(os.path.normpath(hp.resume)),
                 log_dir=os.path.dirname(os.path.normpath(hp.resume)) or ".")
    return Hyperparameters(**saved)


def run_ended(folder: str) -> bool:
    """Whether the run's end was written whole: its `done | ` line is the last thing the end writes (end_run)."""
    try:
        with open(os.path.join(folder, "log.txt"), encoding="utf-8") as handle:
            return any(line.startswith("done | ") for line in handle)
    except OSError:
        return False


def finish_run_end(hp: Hyperparameters, dist_info: Dist, argv: list[str]) -> dict:
    """--resume of a run killed after result.json (review k14): only its end is missing (the last checkpoint's
    removal, the loss plot, the done line); it is done from result.json, nothing trained or scored again."""
    folder = hp.resume
    log = open_run_folder(hp, dist_info, folder, argv)
    result = None
    if dist_info.is_main:
        needs = ("val_loss", "unigram_val_loss", "tokens_seen", "wall_seconds", "peak_memory_bytes", "ranks_agree")
        try:
            with open(os.path.join(folder, "result.json"), encoding="utf-8") as handle:
                result = json.load(handle)
            missing = [name for name in needs if name not in result]
            if missing:
                raise KeyError(", ".join(missing))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            result = (f"--resume {folder}: result.json is damaged ({type(exc).__name__}: {exc}); delete it to "
                      f"score the run again")
    result = dist_info.from_first_rank(result)
    if isinstance(result, str):
        log.close()
        raise ConfigError(result)
    log.write("the run was stopped after result.json was written: writing what its end lacked")
    end_run(hp, dist_info, log, folder, result)
    return result


def end_run(hp: Hyperparameters, dist_info: Dist, log: RunLog, folder: str, result: dict) -> None:
    """A run's end, once result.json is on disk: the last checkpoint goes, the loss plot, the done line (written
    last: run_ended). A kill anywhere in here is completed by --resume (finish_run_end)."""
    dist_info.barrier()  # result.json is on disk before the last checkpoint goes
    if candidate_count(hp) <= 1:  # a single model's last checkpoint was its weights until result.json was written
        remove_checkpoints(folder, 0, dist_info)
    val_loss, unigram, bpb = result["val_loss"], result["unigram_val_loss"], result.get("val_bpb")
    if dist_info.is_main:
        write_loss_plot(folder, f"{result.get('run_id', os.path.basename(folder))} | preset {hp.preset or 'none'} | "
                                f"val {val_loss:.4f}", unigram)
        try:  # each member's checkpoint went when it finished: no empty checkpoints/ folder stays behind
            os.rmdir(os.path.join(folder, "checkpoints"))
        except OSError:
            pass
    bpb_text = "" if bpb is None else f" | val_bpb {bpb:.4f} (unigram {result['unigram_val_bpb']:.4f})"
    log.write(f"done | val_loss {val_loss:.4f} | {unigram_comparison(val_loss, unigram)}{bpb_text} | tokens trained "
              f"on {format_count(result['tokens_seen'])} | wall {format_duration(result['wall_seconds'])} | peak mem "
              f"{result['peak_memory_bytes'] / 2**30:.2f} GiB | ranks agree: "
              f"{'yes' if result['ranks_agree'] else 'NO'} | {folder}")
    log.close()


def saved_hyperparameters(folder: str, may_change: set[str]) -> dict:
    """A run folder's hyperparameters.json, checked: readable JSON, only known fields, and the same values as the
    hyperparameters section log.txt wrote when the run started (an edited batch size would otherwise continue the
    old checkpoint under another schedule); the first difference is named. Fields that --resume may change, or that
    a run of an older script did not log, are not compared."""
    path = os.path.join(folder, "hyperparameters.json")
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {folder}: hyperparameters.json is damaged ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]})") from None
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    if not isinstance(saved, dict) or set(saved) - known:
        unknown = sorted(set(saved) - known) if isinstance(saved, dict) else ["(not an object)"]
        raise ConfigError(f"--resume {folder}: hyperparameters.json has unknown field(s) {', '.join(unknown)}")
    logged = {}
    try:
        with open(os.path.join(folder, "log.txt"), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        title = "hyperparameters"  # the exact header line RunLog.section wrote (the logged source only quotes it)
        lines = lines[lines.index(f"==================== {title} " + "=" * max(0, 80 - len(title))) + 1:]
    except (OSError, ValueError):
        lines = []  # no log or no section: nothing to compare with
    for line in lines:
        name, equals, value = line.partition(" = ")
        if not equals or name not in known:
            break  # the section ends where its `name = value` lines end
        try:
            logged[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
    for name, value in saved.items():
        if name in logged and name not in may_change and logged[name] != value:
            raise ConfigError(f"--resume {folder}: hyperparameters.json says {name} = {value!r} but the run started "
                              f"with {logged[name]!r} (log.txt); its checkpoints belong to the logged value")
    return saved


DATA_FINGERPRINTS = "data.json"  # in the run folder: the token sets the run started on


def data_fingerprints(data: RunData) -> dict:
    """Size and CRC-32 of every token set the run reads, as it reads them: train (after --train_tokens and the
    fitness slice), the fitness slice, val, test. ~0.2 s for 100M tokens."""
    sets = dict(train=data.train_tokens, fitness=data.fitness_data.tokens if data.fitness_data else None,
                val=data.val_tokens, test=data.test_data.tokens if data.test_data else None)
    return {name: dict(tokens=int(tokens.size), crc32=zlib.crc32(np.ascontiguousarray(tokens).view(np.uint8)))
            for name, tokens in sets.items() if tokens is not None}


def check_resume_data(folder: str, data: RunData, dist_info: Dist) -> None:
    """A --resume reads the tokens the run started on (data.json), or stops with one line naming the set that
    changed, before log.txt is touched: a train shard edited between a stop and a resume went unnoticed before
    (review case r16). Runs made before data.json existed are resumed unchecked."""
    problem = ""
    if dist_info.is_main and os.path.isfile(os.path.join(folder, DATA_FINGERPRINTS)):
        with open(os.path.join(folder, DATA_FINGERPRINTS), encoding="utf-8") as handle:
            started = json.load(handle)
        now = data_fingerprints(data)
        for name in sorted(set(started) | set(now)):
            if started.get(name) != now.get(name):
                was, got = started.get(name) or {}, now.get(name) or {}
                problem = (f"--resume: the {name} tokens differ from the ones {folder} started on "
                           f"({was.get('tokens', 0):,} tokens, CRC-32 {was.get('crc32', '-')} then; "
                           f"{got.get('tokens', 0):,}, CRC-32 {got.get('crc32', '-')} now): resume with the same data "
                           f"files and --train_tokens/--val_tokens, or start a new run")
                break
    problem = dist_info.from_first_rank(problem)
    if problem:
        raise ConfigError(problem)


def check_resume_checkpoints(hp: Hyperparameters, dist_info: Dist, folder: str) -> None:
    """Before a resume touches the run folder: every checkpoint file this rank may load (the shared files, its own
    shards, an old single-layout file) must be readable and match the model the saved hyperparameters build (tensor
    names and shapes), the world size and the hyperparameters stored in it; the first mismatch is named, one line.
    mmap=True reads the structure without reading the tensors. The checksums of these files and of the member files
    (every rank reads every member) are compared too (check_saved_file), each file read once more."""
    expected = {name: tuple(t.shape) for name, t in build_model_meta(hp).state_dict().items()}
    group_size = dist_info.world_size // hp.parallel_members
    rank = dist_info.rank % group_size
    for member in range(hp.ensemble_size):
        paths = sorted(path for _, part, path in checkpoint_names(folder, member) if part in ("shared", f"rank{rank}"))
        legacy = checkpoint_path(folder, member, rank)
        complete = checkpoint_steps(folder, member, rank)
        for path in paths + ([legacy] if os.path.isfile(legacy) else []):
            step = next((step for step, _, named in checkpoint_names(folder, member) if named == path), None)
            older = [done for done in complete if step is not None and done < step]  # what --resume falls back to
            advice = (f"delete it to resume member {member} from its checkpoint of step {older[0]}" if older
                      else f"delete it to restart member {member} from its start")
            check_checkpoint_file(hp, path, member, group_size, expected, advice)
    for path in sorted(glob.glob(os.path.join(folder, "members", "member_*.pt"))):
        check_saved_file_once(path, member_file_advice(path))  # load_member does not read it again


def check_checkpoint_file(hp: Hyperparameters, path: str, member: int, group_size: int, expected: dict,
                          advice: str) -> None:
    check_saved_file(path, advice)  # its bytes as written
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        progress = saved["progress"]
        shapes = {name: tuple(t.shape) for name, t in saved["model"].items()} if "model" in saved else expected
    except Exception as exc:  # noqa: BLE001 - truncated zip, another pickle, missing keys: all one complaint
        raise ConfigError(f"--resume: {path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"{advice}") from None
    for name in sorted(set(expected) | set(shapes)):
        if expected.get(name) != shapes.get(name):
            raise ConfigError(f"--resume: {path} does not fit the run's hyperparameters: {name} has shape "
                              f"{shapes.get(name, 'missing')} in the checkpoint, {expected.get(name, 'missing')} "
                              f"in the model")
    if saved.get("world_size", group_size) != group_size:
        raise ConfigError(f"--resume: {path} was written by {saved['world_size']} ranks per member, this run has "
                          f"{group_size}: resume on the same number of ranks (Muon's momentum is sharded)")
    if not isinstance(progress.get("step"), int) or progress["step"] < 0:
        raise ConfigError(f"--resume: {path} holds no valid step ({progress.get('step')!r})")
    # the hyperparameters the checkpoint was trained under: an edit of both hyperparameters.json and log.txt is
    # still caught (fields that do not change the result, and fields of a newer script, are not compared)
    now, ignored = dataclasses.asdict(hp), RESUME_MAY_CHANGE | {"resume", "run_id", "log_dir"}
    for name, value in (saved.get("hyperparameters") or {}).items():
        if name in now and name not in ignored and now[name] != value:
            raise ConfigError(f"--resume: {path} was trained with {name} = {value!r}, the run's hyperparameters now "
                              f"say {now[name]!r} (hyperparameters.json edited?)")


def non_default_hyperparameters(hp: Hyperparameters) -> dict:
    """{name: value} of the fields that differ from the dataclass defaults (a preset's values included)."""
    defaults = Hyperparameters()
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if getattr(hp, f.name) != getattr(defaults, f.name)}


def write_header(log: RunLog, hp: Hyperparameters, dist_info: Dist, argv: list[str]) -> None:
    script_path = os.path.abspath(__file__)
    with open(script_path, encoding="utf-8") as handle:
        log.section(f"source: {script_path}", handle.read().splitlines(), echo=False)
    log.section("command", [" ".join(shlex.quote(a) for a in [sys.executable, script_path, *argv]),
                            f"git commit: {git_commit() or 'none'}", f"run folder: {log.folder}"])
    log.section("environment", environment_report(dist_info))
    log.section("hyperparameters", [f"{k} = {v!r}" for k, v in dataclasses.asdict(hp).items()], echo=False)
    changed = non_default_hyperparameters(hp)  # the terminal shows what this run changed; log.txt keeps them all
    if log.is_main:  # terminal only: log.txt's hyperparameters section stays exactly the `name = value` lines
        print(f"hyperparameters (not at their defaults; all {len(dataclasses.fields(hp))} in log.txt): "
              + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "none"), flush=True)


def open_run_folder(hp: Hyperparameters, dist_info: Dist, folder: str, argv: list[str]) -> RunLog:
    """Creates (or, on --resume, reopens) the run folder and takes its lock, then writes the header (or the resume
    section). A folder that cannot be written (read-only, full) is one line, and a new run's folder is removed again,
    so nothing half-made is left behind. A new run's folder is made by one mkdir, atomic: of two processes starting
    the same run id at once one makes it, the other fails with one line and never removes it (review L6: the loser
    rmtree'd the winner's live folder); no other process can take it before its lock (a --resume needs the
    hyperparameters.json written after the lock). Every rank learns rank 0's outcome, so all stop together."""
    failure, log = None, None
    if dist_info.is_main:
        created = False  # set only once this process made the folder: it never removes one another process made
        try:
            if not hp.resume:  # made and locked by one process: mkdir is atomic, a second maker gets FileExistsError
                os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    raise ConfigError(f"{folder} already exists (another run made it just now): choose another "
                                      f"--run_id") from None
                created = True
            log = RunLog(folder, True, append=True)
            lock_run_folder(folder)
            if hp.resume:
                removed = remove_stale_temporaries(folder)
                end_cut_line(os.path.join(folder, "log.txt"))  # a line cut by ENOSPC or a kill: the section starts anew
                log.section("resume", [" ".join(shlex.quote(a) for a in [sys.executable, os.path.abspath(__file__),
                                                                        *argv]),
                                       f"git commit: {git_commit() or 'none'}"]
                            + [f"removed a partial file of a killed process: {path}" for path in removed])
            else:
                write_header(log, hp, dist_info, argv)
                log.save_json("hyperparameters.json", dataclasses.asdict(hp))
        except OSError as exc:
            failure = f"{folder}: cannot write the run folder there ({exc.strerror or exc})"
        except ConfigError as exc:
            failure = str(exc)
        if failure and log is not None:
            try:
                log.close()
            except OSError:  # the buffered last line cannot be written either
                pass
        if failure and created:
            release_run_locks()
            shutil.rmtree(folder, ignore_errors=True)
    failure = dist_info.from_first_rank(failure)
    if failure:
        raise StorageError(failure)
    unseen = shared_folder_check(folder, dist_info, wait_s=min(30.0, hp.dist_timeout))
    if unseen:
        if dist_info.is_main:
            log.close()
            if not hp.resume:  # this process made it a moment ago: nothing of the run is in it
                release_run_locks()
                shutil.rmtree(folder, ignore_errors=True)
        raise StorageError(f"{folder}: {unseen} of {dist_info.world_size} ranks cannot see the run folder rank 0 made "
                           f"(a node-local --log_dir?): on several nodes --log_dir must be one folder every node "
                           f"shares (NFS, Lustre, ...), as member files written on one node are read on all")
    if not dist_info.is_main:
        log = RunLog(folder, False)
        if hp.resume:
            remove_stale_temporaries(folder)  # this rank's own checkpoint partials
    return log


def shared_folder_check(folder: str, dist_info: Dist, wait_s: float) -> int:
    """How many ranks do not see rank 0's hyperparameters.json in the run folder within wait_s (a shared file
    system may show a new file to other nodes a moment late), summed over the world; 0 on one rank. Found at the
    start, not when round 1 ends and a member file written on another node is missing."""
    if dist_info.world_size == 1:
        return 0
    deadline = time.monotonic() + wait_s
    path = os.path.join(folder, "hyperparameters.json")
    while not os.path.isfile(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    flag = torch.tensor([0.0 if os.path.isfile(path) else 1.0], device=dist_info.device)
    return int(dist_info.all_reduce_sum(flag).item())


# --- Memory plan: what one rank holds, from the configuration alone (a meta-device model: no allocation, no work) ---

# The review of the GPU paths (../shared/reviews/slowrun_fidelity.md, part B) found that the README's 8-member
# ensemble cannot fit an 80 GB card; nothing said so before the run died. The plan below says it at startup.
PLAN_HEADROOM = 0.95  # of the device's memory: the rest for the CUDA context and the caching allocator's fragments


def activation_bytes_per_token(hp: Hyperparameters, compute_bytes: int) -> int:
    """ESTIMATE of the activations autograd keeps per token for one forward + backward of the layers, itemised from
    the tensors the eager graph saves (counted on CPU with torch.autograd.graph.saved_tensors_hooks; a test holds
    the estimate to that count within 15%). compute_bytes: 2 under bf16 autocast (CUDA), 4 in fp32 (CPU). Per layer:
    the fp32 residual stream at each norm (wte is an fp32 master copy); the normed input, which autocast casts to
    bf16 once per matrix that reads it (q, k, v; SwiGLU's c_fc and c_gate); q and k in fp32 at their norm (autocast
    runs rms_norm in fp32); attention's q, k, v and output; the output projection's input; the MLP's hidden tensors
    (SwiGLU: c_fc, c_gate, silu, their product; ReLU^2: relu and its square); a dropout mask per branch; the gate
    and value-projection inputs where on. torch.compile usually saves less (it recomputes cheap pointwise ops)."""
    width, hidden, c = hp.n_embd, mlp_hidden_width(hp), compute_bytes
    fp32 = c == 4  # in fp32 the matrices reading one normed input share it; autocast gives each its own bf16 copy
    swiglu = hp.mlp == "swiglu"
    dropout_mask = c * width if hp.dropout > 0 else 0
    attention = 4 * width + (1 if fp32 else 3) * c * width + 8 * width + 4 * c * width + c * width + dropout_mask
    attention += c * width if hp.attn_gate else 0
    mlp = 4 * width + (2 if swiglu and not fp32 else 1) * c * width + (4 if swiglu else 2) * c * hidden + dropout_mask
    per_layer = attention + mlp
    value_layers = sum(has_value_proj(layer, hp.n_layer) for layer in range(hp.n_layer)) \
        if hp.value_proj or hp.value_embed_tables else 0
    layers = hp.n_layer + (hp.loop_repeats * (loop_layer_range(hp)[1] - loop_layer_range(hp)[0]) if hp.loop_repeats
                           else 0)
    return layers * per_layer + value_layers * 2 * c * width + 4 * width  # + the embedding's fp32 output


def loss_head_bytes_per_token(hp: Hyperparameters, device_type: str, compute_bytes: int) -> int:
    """ESTIMATE of the lm_head and loss memory per token: the lm_head's input, then the fused loss keeps the raw
    logits and their gradient (compute dtype); the eager loss the raw logits, their float32 soft-cap and
    log-softmax."""
    fused = hp.fused_loss == "on" or (hp.fused_loss == "auto" and device_type == "cuda")
    per_token = 2 * compute_bytes * hp.vocab_size if fused or hp.fused_loss == "chunked" else \
        compute_bytes * hp.vocab_size + 2 * 4 * hp.vocab_size
    return (compute_bytes * hp.n_embd + per_token) * (2 if hp.mtp_weight > 0 else 1)


def memory_plan(hp: Hyperparameters, world_size: int, device_type: str, device_bytes: int = 0,
                host_ram_bytes: int = 0) -> dict:
    """Bytes on rank 0 (the rank with the largest Muon shard) of a run of these hyperparameters on world_size ranks,
    from a meta-device model: nothing is allocated. Exact: parameters, gradients and optimizer state (AdamW's two
    moments and step counter, Muon's momentum for the matrices this rank orthogonalises, NorMuon's second moments).
    Estimated: activations and the loss head per device batch, evaluation's logits. Frozen models (finished members,
    their snapshots, the EMA and SWA copies) are counted where the training loop keeps them: on the device, fp32.
    host_ram_bytes: a node's RAM, against which candidates_on_disk auto decides (0: none, the candidates in memory)."""
    group_world = world_size // max(1, hp.parallel_members)  # the ranks that train one member together
    model = build_model_meta(hp)
    compute_bytes = 2 if device_type == "cuda" else 4  # bf16 autocast on CUDA (autocast_context)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    meta = Dist(rank=0, world_size=1, device=torch.device("meta"))
    adamw, muon = build_optimizers(model, dataclasses.replace(hp, muon_gram="torch", muon_compile="off"), meta)
    adam_bytes = sum(2 * p.numel() * p.element_size() + 4 for group in adamw.param_groups for p in group["params"])
    muon_bytes = 0
    for group in muon.param_groups:
        for p in group["params"][0::group_world]:  # rank 0 owns params 0, world, 2 world, ... of each shape
            muon_bytes += p.numel() * p.element_size()
            if hp.normuon:  # one fp32 value per row (tall) or per column (wide)
                muon_bytes += 4 * (p.size(-2) if p.size(-2) >= p.size(-1) else p.size(-1))
    tokens = hp.device_batch_size * hp.seq_len
    activations = tokens * (activation_bytes_per_token(hp, compute_bytes)
                            + loss_head_bytes_per_token(hp, device_type, compute_bytes))
    if compute_bytes < 4:  # autocast's bf16 copy of every matrix (cached per forward, saved for the backward)
        activations += compute_bytes * sum(p.numel() for name, p in model.named_parameters()
                                           if p.ndim == 2 and not name.startswith(("wte.", "value_embeds.")))
    eval_logits = 2 * 4 * hp.val_batch_size * hp.seq_len * hp.vocab_size  # fp32 logits and their log-softmax
    # frozen models wait in host memory (park_on_host; host_memory_plan); on the device while the last member trains:
    # its teacher (held while it teaches; distill_teacher ensemble: one body at a time plus every teacher's lm_head,
    # TeacherHead); snapshots are scored as the training model and copied straight to the host (frozen_host_copy)
    # (distill_from's teachers are counted at this model's size)
    outside = len(distill_from_files(hp.distill_from)) if hp.distill_from else 0
    teaching = hp.distill_alpha > 0 and (hp.ensemble_size > 1 or hp.snapshot_distill or outside > 0)
    frozen_training = 1 if teaching else 0
    head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    teacher_heads = (hp.ensemble_size - 1) * head_bytes if teaching and hp.distill_teacher == "ensemble" and \
        hp.ensemble_size > 2 else 0
    teacher_heads = outside * head_bytes if outside > 1 else teacher_heads
    # the EMA's copy; each checkpoint average's running sum (SWA's, ckpt_avg's: added to in place)
    averages = (1 if hp.ema_decay > 0 else 0) + (1 if hp.swa_epochs else 0) + (1 if hp.ckpt_avg_epochs else 0)
    distill = 0
    if hp.distill_alpha > 0 and (hp.ensemble_size > 1 or outside):  # teacher features, a chunk of teacher log-probs
        teachers = outside or (hp.ensemble_size - 1 if hp.distill_teacher == "ensemble" else 1)
        distill = tokens * teachers * hp.n_embd * compute_bytes + 3 * 4 * hp.distill_chunk * hp.device_batch_size \
            * hp.vocab_size
    training_state = param_bytes + grad_bytes + adam_bytes + muon_bytes
    peak_without_averages = training_state + max(activations + distill, eval_logits) + \
        frozen_training * param_bytes + teacher_heads
    # averaging_on_host auto: the EMA/SWA accumulators go to host memory only when they would not fit on the device
    averages_on_host = hp.averaging_on_host == "on" or (
        hp.averaging_on_host == "auto" and bool(device_bytes) and averages > 0 and
        peak_without_averages + averages * param_bytes > PLAN_HEADROOM * device_bytes)
    device_averages = 0 if averages_on_host else averages
    peak_training = peak_without_averages + device_averages * param_bytes
    # after the last member the candidates are scored one at a time (score: one model, its logits
    # and log-softmax, a float per target); ensemble_mode logit mixes whole logits, so all of them at once
    scored_together = candidate_count(hp) if hp.ensemble_mode == "logit" else 1
    peak_final = scored_together * param_bytes + 3 * eval_logits // 2
    adam_state = adam_bytes
    checkpoint = param_bytes + adam_state + muon_bytes + (param_bytes if hp.ema_decay > 0 else 0) + \
        (param_bytes if hp.swa_epochs else 0) + (param_bytes if hp.ckpt_avg_epochs else 0)
    return dict(world_size=world_size, group_world=group_world, device_type=device_type, compute_bytes=compute_bytes,
                parameters=sum(p.numel() for p in model.parameters()), param_bytes=param_bytes,
                grad_bytes=grad_bytes, adam_bytes=adam_bytes, muon_bytes=muon_bytes,
                optimizer_bytes=adam_bytes + muon_bytes, tokens=tokens, activation_bytes=activations,
                distill_bytes=distill, eval_bytes=eval_logits, frozen_models=frozen_training,
                average_copies=device_averages, frozen_bytes=frozen_training * param_bytes + teacher_heads +
                device_averages * param_bytes, teacher_head_bytes=teacher_heads, averaging_on_host=averages_on_host,
                **candidate_storage_plan(hp, world_size, model, (averages - device_averages) * param_bytes,
                                         host_ram_bytes),
                peak_training=peak_training, peak_final=peak_final, peak=max(peak_training, peak_final),
                checkpoint_bytes=checkpoint, member_file_bytes=param_bytes,
                member_files=candidate_count(hp) if candidate_count(hp) > 1 else 0, device_bytes=device_bytes)


def node_ranks(world_size: int) -> int:
    """The ranks on one node: torchrun's LOCAL_WORLD_SIZE (on several nodes fewer than the world), else the world
    (one node; --plan_only for several nodes: set LOCAL_WORLD_SIZE to the GPUs per node)."""
    return min(world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def host_memory_plan(hp: Hyperparameters, world_size: int, model: nn.Module, averages_bytes: int) -> dict:
    """Host memory of one rank, exact, as train() splits the frozen models (frozen_store): over the world, except,
    with --parallel_members and distillation, the members of earlier rounds (teachers) over their group's ranks until
    the last member is trained; a member's snapshots over the group while it trains. While the last member trains:
    the members and snapshots of the earlier rounds, this member's snapshots, the EMA/SWA accumulators under
    averaging_on_host; after it, every candidate, the earlier members still over the groups until split over the
    world. model: the meta-device model (frozen_host_bytes)."""
    shards, group = (world_size, world_size // max(1, hp.parallel_members)) if hp.frozen_shards else (1, 1)
    world_share, group_share = frozen_host_bytes(model, shards), frozen_host_bytes(model, group)
    per_member, candidates = candidate_count(hp) // hp.ensemble_size, candidate_count(hp)
    earlier = hp.ensemble_size - hp.parallel_members  # members trained in the rounds before the last
    member_share = group_share if hp.distill_alpha > 0 else world_share
    training = earlier * member_share + earlier * (per_member - 1) * world_share + (per_member - 1) * group_share \
        + averages_bytes
    after = earlier * member_share + (candidates - earlier) * world_share
    host = max(training, after)
    return dict(frozen_host_models=candidates, frozen_host_model_bytes=world_share, frozen_host_shards=shards,
                frozen_group_model_bytes=group_share, host_training_bytes=training, host_final_bytes=candidates *
                world_share, host_bytes=host, host_node_bytes=node_ranks(world_size) * host,
                node_ranks=node_ranks(world_size))


def host_memory_line(plan: dict, gib) -> str:
    """The plan's host line: per rank and, for the world_size ranks on one node, per node (GiB and exact bytes)."""
    shards = plan["frozen_host_shards"]
    split = f", each split over {shards} ranks (1/{shards} per rank)" if shards > 1 else ", each whole on every rank"
    return (f"host        {gib(plan['host_bytes']):>11} | {plan['host_final_bytes']:,} B: {plan['frozen_host_models']} "
            f"frozen models (members, snapshots) at the end x {plan['frozen_host_model_bytes']:,} B{split}, in "
            f"{'pinned ' if plan['device_type'] == 'cuda' else ''}host memory, one on the device at a time"
            + (f"; up to {plan['host_bytes']:,} B while the last member trains (teachers split over a member's "
               f"ranks, {plan['frozen_group_model_bytes']:,} B each"
               + (", the EMA/SWA accumulators" if plan["averaging_on_host"] else "") + ")"
               if plan["host_bytes"] > plan["host_final_bytes"] else "")
            + (f"; x{plan['node_ranks']} ranks = {gib(plan['host_node_bytes'])} ({plan['host_node_bytes']:,} B) "
               f"per node" if plan["host_bytes"] and plan["node_ranks"] > 1 else ""))


def candidate_storage_plan(hp: Hyperparameters, world_size: int, model: nn.Module, averages_bytes: int,
                           host_ram_bytes: int) -> dict:
    """host_memory_plan, or the candidates kept as their files (disk_memory_plan) under candidates_on_disk on, or
    auto where the node's RAM (host_ram_bytes) would refuse the in-memory figure (host_memory_refusal); the plan's
    candidates_on_disk says which."""
    plan = dict(host_memory_plan(hp, world_size, model, averages_bytes), world_size=world_size)
    ranks_here = node_ranks(world_size)
    refused = bool(host_ram_bytes) and bool(host_memory_refusal(plan, ranks_here, host_ram_bytes))
    on_disk = candidate_count(hp) > 1 and (hp.candidates_on_disk == "on" or
                                           (hp.candidates_on_disk == "auto" and refused))
    plan.pop("world_size")
    return dict(plan, **disk_memory_plan(hp, world_size, model, averages_bytes), candidates_on_disk=True) if on_disk \
        else dict(plan, candidates_on_disk=False)


def disk_memory_plan(hp: Hyperparameters, world_size: int, model: nn.Module, averages_bytes: int) -> dict:
    """Host memory of one rank, exact, with the candidates kept as their files (file_candidate): each keeps only the
    buffers its file lacks (the RoPE tables, whole on every rank); in host memory as before only the frozen models
    that teach: the members of earlier rounds that teach later ones (over their group's ranks) and, with
    snapshot_distill, the latest snapshot and, while a snapshot is taken, the previous one (over the member's ranks);
    the EMA/SWA accumulators under averaging_on_host. Disk: every candidate's file (save_candidate: the state dict),
    written by rank 0 of its member's group. model: the meta-device model."""
    shards, group = (world_size, world_size // max(1, hp.parallel_members)) if hp.frozen_shards else (1, 1)
    world_share, group_share = frozen_host_bytes(model, shards), frozen_host_bytes(model, group)
    in_file = model.state_dict()
    kept = sum(t.numel() * t.element_size() for name, t in model.named_buffers() if name not in in_file)
    file_bytes = sum(t.numel() * t.element_size() for t in in_file.values())
    per_member, candidates = candidate_count(hp) // hp.ensemble_size, candidate_count(hp)
    earlier = hp.ensemble_size - hp.parallel_members  # members trained in the rounds before the last
    teaching = earlier if hp.distill_alpha > 0 and not hp.snapshot_distill_after and not hp.distill_from else 0
    teaching += len(distill_from_files(hp.distill_from)) if hp.distill_from else 0  # at this model's size
    member_share = group_share if hp.distill_alpha > 0 else world_share
    snapshot_teachers = 2 if hp.snapshot_distill and per_member > 1 else 0
    training = teaching * member_share + snapshot_teachers * group_share + averages_bytes \
        + (earlier * per_member + per_member - 1) * kept
    host = max(training, candidates * kept)
    return dict(host_training_bytes=training, host_final_bytes=candidates * kept, host_bytes=host,
                host_node_bytes=node_ranks(world_size) * host, node_ranks=node_ranks(world_size),
                file_candidate_host_bytes=kept, candidate_file_bytes=file_bytes,
                candidate_disk_bytes=candidates * file_bytes, teaching_host_models=teaching + snapshot_teachers,
                member_share_bytes=member_share)


def candidate_memory_lines(plan: dict, gib) -> list[str]:
    """The plan's host line (host_memory_line), or with the candidates kept as their files its host and disk lines."""
    if not plan["candidates_on_disk"]:
        return [host_memory_line(plan, gib)]
    teachers = plan["teaching_host_models"]
    return [
        f"host        {gib(plan['host_bytes']):>11} | {plan['host_bytes']:,} B: {plan['frozen_host_models']} "
        f"candidates kept as their files (candidates_on_disk), {plan['file_candidate_host_bytes']:,} B each in host "
        f"memory (RoPE tables); " + (f"up to {plan['host_training_bytes']:,} B while the last member trains "
                                     f"({teachers} teacher(s) in {'pinned ' if plan['device_type'] == 'cuda' else ''}"
                                     f"host memory, {plan['frozen_group_model_bytes']:,} B each"
                                     + (", the EMA/SWA accumulators" if plan["averaging_on_host"] else "") + "); "
                                     if plan["host_training_bytes"] > plan["host_final_bytes"] else "")
        + f"x{plan['node_ranks']} ranks = {gib(plan['host_node_bytes'])} ({plan['host_node_bytes']:,} B) per node",
        f"disk        {gib(plan['candidate_disk_bytes']):>11} | {plan['candidate_disk_bytes']:,} B: "
        f"{plan['frozen_host_models']} candidate files x {plan['candidate_file_bytes']:,} B in members/, each read "
        f"back (by the rank that wrote it: rank 0 of its member's group, broadcast to the others) whenever it is "
        f"scored, one at a time; all on rank 0's node when the run is one node",
    ]


def memory_plan_lines(hp: Hyperparameters, plan: dict) -> list[str]:
    """The plan as the log prints it (GiB = 2^30 bytes; ~ marks estimates)."""
    def gib(count: float) -> str:
        return f"{count / 2**30:.2f} GiB"
    activation_note = (f"{plan['tokens']:,} tokens/rank/micro-step ({hp.device_batch_size} x {hp.seq_len}), "
                       f"{'bf16' if plan['compute_bytes'] == 2 else 'fp32'} compute")
    lines = [
        f"per rank (rank 0 of {plan['world_size']}, members trained by {plan['group_world']} ranks each); "
        f"~ marks estimates",
        f"parameters  {gib(plan['param_bytes']):>11} | {plan['parameters']:,} fp32 master weights",
        f"gradients   {gib(plan['grad_bytes']):>11} | fp32, one per parameter",
        f"optimizer   {gib(plan['optimizer_bytes']):>11} | AdamW moments {gib(plan['adam_bytes'])} (embedding, "
        f"lm_head, scalars) + Muon momentum{' + NorMuon' if hp.normuon else ''} {gib(plan['muon_bytes'])} "
        f"(this rank's 1/{plan['group_world']} of the matrices)",
        f"activations {'~' + gib(plan['activation_bytes']):>11} | {activation_note}",
    ]
    if plan["distill_bytes"]:
        lines.append(f"distillation{'~' + gib(plan['distill_bytes']):>11} | teacher features + chunks of teacher "
                     f"log-probs")
    lines += [
        f"evaluation  {'~' + gib(plan['eval_bytes']):>11} | fp32 logits + log-softmax of {hp.val_batch_size} x "
        f"{hp.seq_len} tokens (not at the same time as the activations)",
        f"frozen      {gib(plan['frozen_bytes']):>11} | on the device while the last member trains: "
        f"{plan['frozen_models']} frozen model(s) in use (its teacher)"
        + (f" + {plan['teacher_head_bytes'] / 2**30:.2f} GiB teacher lm_heads" if plan["teacher_head_bytes"] else "")
        + f" + {plan['average_copies']} EMA/SWA copies, fp32",
        *candidate_memory_lines(plan, gib),
        f"peak        {'~' + gib(plan['peak_training']):>11} | training; after the last member "
        f"~{gib(plan['peak_final'])} ({candidate_count(hp)} candidate(s) scored "
        f"{'together' if hp.ensemble_mode == 'logit' else 'one at a time'})",
        f"checkpoint  {gib(plan['checkpoint_bytes']):>11} | on disk per checkpoint, rank 0 (model + AdamW"
        f"{' + EMA' if hp.ema_decay > 0 else ''}{' + SWA' if hp.swa_epochs else ''} + its Muon shard); each other of "
        f"the {plan['world_size']} ranks writes only its own Muon shard, {gib(plan['muon_bytes'])}; members/: "
        f"{plan['member_files']} x {gib(plan['member_file_bytes'])} on rank 0",
    ]
    if plan["device_bytes"]:
        share = plan["peak"] / plan["device_bytes"]
        lines.append(f"device      {gib(plan['device_bytes']):>11} | peak ~{gib(plan['peak'])} = {100 * share:.0f}% "
                     f"of it: {'fits' if plan['peak'] <= PLAN_HEADROOM * plan['device_bytes'] else 'DOES NOT FIT'}")
    else:
        lines.append("device      not checked | CPU: state --memory_budget_gb to check a plan against a device")
    return lines


def memory_plan_refusal(hp: Hyperparameters, plan: dict) -> str:
    """"" when the plan fits the device (or there is no device size to check against), else one line that names
    the setting to change."""
    budget = PLAN_HEADROOM * plan["device_bytes"]
    if not plan["device_bytes"] or plan["peak"] <= budget:
        return ""
    head = (f"memory plan: ~{plan['peak'] / 2**30:.1f} GiB per rank does not fit {plan['device_bytes'] / 2**30:.1f} "
            f"GiB ({100 * PLAN_HEADROOM:.0f}% usable)")
    fixed = plan["peak_training"] - plan["activation_bytes"] - plan["distill_bytes"]
    per_sequence = (plan["activation_bytes"] + plan["distill_bytes"]) / hp.device_batch_size
    fitting = int((budget - fixed) // per_sequence) if budget > fixed else 0
    batch_seqs = hp.batch_tokens // hp.seq_len  # a device batch that still splits the step's sequences evenly
    fitting = max([size for size in range(1, fitting + 1) if batch_seqs % (size * plan["group_world"]) == 0],
                  default=0)
    frozen = plan["frozen_bytes"] > 0 or candidate_count(hp) > 1
    if frozen and plan["peak_training"] - plan["frozen_bytes"] <= budget:  # it is the frozen models that do not fit
        smaller_batch = f", or --device_batch_size {fitting}" if plan["peak_final"] <= budget and fitting >= 1 else ""
        scored = candidate_count(hp) if hp.ensemble_mode == "logit" else 1
        return (f"{head}: up to {max(plan['frozen_models'] + plan['average_copies'], scored)} frozen "
                f"fp32 models stay on the device; lower --ensemble_size, --snapshot_cycles or --epoch_snapshots "
                f"(or --ensemble_mode prob, --averaging_on_host on, or drop --ema_decay/--swa_epochs){smaller_batch}")
    if fitting >= 1:
        return f"{head}: lower --device_batch_size from {hp.device_batch_size} to {fitting} or less"
    return (f"{head}: the model's training state alone needs ~{fixed / 2**30:.1f} GiB; use a smaller model "
            f"(--n_layer, --n_embd) or more ranks (Muon's momentum is sharded over them)")


def plan_device(hp: Hyperparameters, dist_info: Dist) -> tuple[str, int]:
    """(device type, its memory in bytes) the plan is made for: --memory_budget_gb if given, else what CUDA reports;
    --plan_only without CUDA plans for a GPU (the node about to be rented) unless --device cpu."""
    device_type = dist_info.device.type
    if hp.plan_only and device_type == "cpu" and hp.device != "cpu":
        device_type = "cuda"
    if hp.memory_budget_gb:
        return device_type, int(hp.memory_budget_gb * 2**30)
    if dist_info.device.type == "cuda":
        return device_type, torch.cuda.get_device_properties(dist_info.device).total_memory
    return device_type, 0


def check_memory_plan(hp: Hyperparameters, dist_info: Dist) -> list[str]:
    """The plan's lines for the log; raises ConfigError (one line, the setting to change) when it cannot fit."""
    device_type, device_bytes = plan_device(hp, dist_info)
    ram = plan_host_ram(hp)
    plan = memory_plan(hp, hp.plan_world_size or dist_info.world_size, device_type, device_bytes, ram)
    lines = memory_plan_lines(hp, plan)
    if hp.plan_only and dist_info.is_main:
        print("\n".join(["memory plan" + (f" | preset {hp.preset}" if hp.preset else "")] + lines), flush=True)
    refusal = memory_plan_refusal(hp, plan)
    if not refusal and ram:  # a real run on this machine (or --host_memory_gb): its ranks' frozen models in its RAM
        ranks_here = node_ranks(plan["world_size"])
        refusal = host_memory_refusal(plan, ranks_here, ram)
    if refusal:
        raise ConfigError(refusal)
    return lines


def physical_memory_bytes() -> int:
    """This machine's RAM (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def plan_host_ram(hp: Hyperparameters) -> int:
    """The RAM per node the host figure is held to: --host_memory_gb, else this machine's for a real run; none for
    --plan_only (a laptop's RAM says nothing of the node it plans)."""
    if hp.host_memory_gb:
        return int(hp.host_memory_gb * 2**30)
    return 0 if hp.plan_only else physical_memory_bytes()


def resolve_candidates_on_disk(hp: Hyperparameters, dist_info: Dist) -> Hyperparameters:
    """candidates_on_disk auto becomes on or off as the memory plan decides (on exactly when this node's RAM would
    refuse the candidates in host memory), rank 0's decision on every rank; the log and hyperparameters.json record
    the outcome."""
    if hp.candidates_on_disk != "auto":
        return hp
    device_type, device_bytes = plan_device(hp, dist_info)
    plan = memory_plan(hp, hp.plan_world_size or dist_info.world_size, device_type, device_bytes, plan_host_ram(hp))
    on_disk = dist_info.from_first_rank(plan["candidates_on_disk"])
    return dataclasses.replace(hp, candidates_on_disk="on" if on_disk else "off")


def eval_only_on_disk(hp: Hyperparameters, paths: list[str], dist_info: Dist) -> bool:
    """--eval_only: whether the saved members are kept as their files (candidates_on_disk; auto: when their bytes,
    as frozen_store splits them, would take over 90% of this node's RAM), rank 0's decision on every rank."""
    if hp.candidates_on_disk != "auto":
        return hp.candidates_on_disk == "on"
    ram, ranks_here = plan_host_ram(hp), node_ranks(dist_info.world_size)
    total = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
    need = total * ranks_here / (dist_info.world_size if hp.frozen_shards else 1)
    return dist_info.from_first_rank(bool(ram) and need > 0.9 * ram)


def host_memory_refusal(plan: dict, ranks_here: int, ram_bytes: int) -> str:
    """"" when the frozen models every rank on this machine keeps in host memory (each rank its share of every one of
    them, frozen_store: every rank scores its share of the windows with every candidate) fit 90% of its RAM, else
    one line. Found before the run, not hours later by the OOM killer."""
    need = plan["host_bytes"] * ranks_here
    if not ram_bytes or need <= 0.9 * ram_bytes:
        return ""
    return (f"memory plan: {ranks_here} rank(s) x {plan['host_bytes'] / 2**30:.1f} GiB of frozen models in host memory "
            f"= {need / 2**30:.1f} GiB, over 90% of this node's {ram_bytes / 2**30:.1f} GiB; lower --ensemble_size, "
            f"--snapshot_cycles or --epoch_snapshots (or "
            + ("" if plan.get("candidates_on_disk") else "--candidates_on_disk on, ") + "--averaging_on_host off"
            + (", or --frozen_shards true)" if plan.get("frozen_host_shards", 1) < plan["world_size"] else ")"))


def resolve_averaging_on_host(hp: Hyperparameters, dist_info: Dist) -> Hyperparameters:
    """averaging_on_host auto becomes on or off as the memory plan decides (on only when the EMA/SWA accumulators
    would not fit on the device beside the training state); the log and hyperparameters.json record the outcome."""
    if hp.averaging_on_host != "auto":
        return hp
    device_type, device_bytes = plan_device(hp, dist_info)
    plan = memory_plan(hp, hp.plan_world_size or dist_info.world_size, device_type, device_bytes)
    return dataclasses.replace(hp, averaging_on_host="on" if plan["averaging_on_host"] else "off")


# --- Logging, storage and locks: logs/<run_id>/ with log.txt, metrics.jsonl, result.json, members/ ---


class RunLog:
    """Writes the run folder. Every line goes to log.txt at once (a crash loses nothing) and to the terminal."""

    def __init__(self, folder: str, is_main: bool, append: bool = False, group: int = 0):
        self.folder, self.is_main = folder, is_main
        self._log = self._metrics = None
        self.tracker = None  # a wandb run (--wandb) that receives every metrics row too
        if is_main:
            os.makedirs(folder, exist_ok=append)
            log_name, metrics_name = group_log_names(group)
            self._log = open(os.path.join(folder, log_name), "a", encoding="utf-8")
            self._metrics = open(os.path.join(folder, metrics_name), "a", encoding="utf-8")

    def write(self, text: str, echo: bool = True) -> None:
        if not self.is_main:
            return
        # a path of undecodable bytes in argv (held as surrogates) goes out as \udcff escapes, to log.txt and to the
        # terminal alike, not as a UnicodeEncodeError traceback from the header that leaves a half-made run folder
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if self._log is not None:  # None once an append failed: the run is stopping with that line
            self._append(self._log, text + "\n")
        if echo:
            print(text, flush=True)

    def _append(self, handle, text: str) -> None:
        """text onto log.txt or metrics.jsonl, flushed at once. A write that fails (a full disk, a quota, a disk gone
        read-only) stops the run with one line naming the file, not a traceback; the handle is closed first (its
        unwritten tail dropped, so exiting cannot fail on it again) and the last checkpoint stays for --resume."""
        try:
            handle.write(text)
            handle.flush()
        except OSError as exc:
            try:
                handle.close()
            except OSError:  # the buffered tail cannot be written either: the handle is closed all the same
                pass
            self._log = None if handle is self._log else self._log
            self._metrics = None if handle is self._metrics else self._metrics
            raise StorageError(f"{handle.name}: cannot append to it ({exc.strerror or exc}): the run stops here; "
                               f"make room, then --resume {self.folder} continues from its last checkpoint") from None

    def section(self, title: str, lines: list[str], echo: bool = True) -> None:
        self.write(f"==================== {title} " + "=" * max(0, 80 - len(title)), echo=echo)
        for line in lines:
            self.write(line, echo=echo)

    def metrics(self, row: dict) -> None:
        if self.is_main:
            if self._metrics is not None:
                self._append(self._metrics, json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log(tracker_row(row))

    def save_json(self, name: str, payload: dict) -> None:
        if self.is_main:
            atomic_write_bytes(os.path.join(self.folder, name), (json.dumps(payload, indent=2) + "\n").encode())

    def close(self) -> None:
        for handle in (self._log, self._metrics):
            if handle is not None:
                handle.close()
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def group_log_names(group: int) -> tuple[str, str]:
    """The log and metrics files of a group training members at once (--parallel_members): group 0's are the run's
    log.txt and metrics.jsonl; another group's rank 0 (on another node, maybe) writes files of its own, merged into
    them at the round's end (merge_group_logs): no two nodes append to one file (appends from two NFS clients can
    interleave or overwrite each other)."""
    return ("log.txt", "metrics.jsonl") if group == 0 else (f"log_group{group}.txt", f"metrics_group{group}.jsonl")


def merge_group_logs(folder: str) -> None:
    """Appends every other group's log and metrics files to log.txt and metrics.jsonl (group by group) and removes
    them; rank 0 alone, once the groups have closed them. Safe to repeat after a kill at any point: a file whose bytes
    already end the run's file was appended before the kill and is only removed (nothing else writes in between)."""
    groups = sorted(int(m.group(1)) for name in os.listdir(folder)
                    for m in [re.fullmatch(r"log_group(\d+)\.txt", name)] if m)
    for group in groups:
        for source, target in zip(group_log_names(group), group_log_names(0)):
            source_path, target_path = os.path.join(folder, source), os.path.join(folder, target)
            if not os.path.isfile(source_path):
                continue
            with open(source_path, "rb") as handle:
                text = handle.read()
            text += b"\n" if text and not text.endswith(b"\n") else b""  # a line cut by a kill ends here
            with open(target_path, "a+b") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - len(text)))
                if text and (size < len(text) or handle.read() != text):
                    handle.seek(0, os.SEEK_END)
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
            os.remove(source_path)


class StorageError(ConfigError):
    """The run folder cannot be written (full disk, read-only, no permission): one line naming the folder."""


def free_disk_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def saved_size_estimate(obj) -> int:
    """Bytes torch.save will write for obj: its tensors' storages (each once) plus 1 MiB for the pickle and the zip
    records. A full-scale checkpoint is ~9.6 GB per rank: checked before writing, not discovered half-way."""
    seen, total, pending = set(), 0, [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), str(item.device))
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total + 2**20


def atomic_write(path: str, size: int, write) -> None:
    """write(temporary) then a rename: a crash while writing leaves the previous file intact. The free space is
    checked against size first; on any error (ENOSPC included) the partial temporary is removed, so a full disk does
    not stay full, and the failure is one line naming the folder, the need and the free space."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        free = free_disk_bytes(folder)
    except OSError as exc:
        raise StorageError(f"{folder}: cannot write {os.path.basename(path)} there ({exc.strerror or exc})") from None
    if size > free:
        raise StorageError(f"{folder}: no room for {os.path.basename(path)}: it needs {format_bytes(size)}, "
                           f"{format_bytes(free)} free")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports ENOSPC as RuntimeError "unexpected pos"
        if os.path.exists(temporary):
            os.remove(temporary)
        detail = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).splitlines()[0]
        raise StorageError(f"{folder}: writing {os.path.basename(path)} ({format_bytes(size)}) failed with "
                           f"{format_bytes(free_disk_bytes(folder))} free: {detail}") from None


def format_bytes(count: int) -> str:
    if count < 2**20:
        return f"{count:,} bytes"
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def write_file_bytes(path: str, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)


def atomic_write_bytes(path: str, payload: bytes) -> None:
    atomic_write(path, len(payload), functools.partial(write_file_bytes, payload=payload))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through a temporary file and a rename: a crash while saving leaves the previous file intact."""
    atomic_write(path, saved_size_estimate(obj), functools.partial(torch.save, obj))


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Deletes the `<file>.tmp<pid>` partials of atomic writes whose process is gone (killed mid-write): at full
    scale each is a whole checkpoint that would keep the disk full. Returns the paths removed."""
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            stem, dot_tmp, pid = name.rpartition(".tmp")
            if dot_tmp and stem and pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                try:
                    os.remove(os.path.join(root, name))
                    removed.append(os.path.join(root, name))
                except FileNotFoundError:  # another rank removed it first
                    pass
    return removed


RUN_LOCKS: list = []  # the open run.lock files this process holds; main closes them on the way out


def lock_run_folder(folder: str) -> None:
    """Takes <folder>/run.lock, an flock held for the life of the process, the file holding 'pid host': a second
    process on a live run (a --resume while it still trains) is refused with the holder's pid and host. The kernel
    drops the lock when its holder dies however it dies (kill -9 included), so a stale lock is simply taken over,
    and two processes taking over at once cannot both get it."""
    import fcntl  # POSIX only, like the rest of the launch path (torchrun, gloo)
    path = os.path.join(folder, "run.lock")
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"{folder}: cannot create run.lock there ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().split()
        handle.close()
        pid, host = (holder + ["?", "?"])[:2]
        raise ConfigError(f"{folder} is in use by pid {pid} on {host} (it holds run.lock): wait for that run to end "
                          f"before resuming it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {socket.gethostname()}\n")
    handle.flush()
    RUN_LOCKS.append(handle)


def release_run_locks() -> None:
    while RUN_LOCKS:
        RUN_LOCKS.pop().close()  # closing drops the flock; the file stays (removing it would race a new taker)


def parameter_fingerprint(model: nn.Module) -> torch.Tensor:
    """One float64 sum per parameter tensor: equal on every rank when the ranks hold the same weights."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()])


def ranks_agree(model: nn.Module, dist_info: Dist) -> bool:
    """Checks that every rank ended with bitwise the same weights (they apply the same updates)."""
    if dist_info.world_size == 1:
        return True
    mine = parameter_fingerprint(model).to(dist_info.device)
    everyone = [torch.empty_like(mine) for _ in range(dist_info.world_size)]
    dist.all_gather(everyone, mine, group=dist_info.group)
    return all(torch.equal(mine, other) for other in everyone)


def replace_between_markers(text: str, begin: str, end: str, new_body: str) -> str:
    """text with everything between the marker `begin` and the marker `end` replaced by new_body (one newline after
    each): how the companion tools rewrite their generated part of a hand-written file (records.py the README's
    leaderboard, the benches their sections of bench/RESULTS.md). Refuses anything but exactly one begin followed
    by exactly one end, so that a generated section never swallows hand-written text."""
    start, stop = text.find(begin), text.find(end)
    if text.count(begin) != 1 or text.count(end) != 1 or stop < start:
        raise ValueError(f"needs exactly one {begin} line followed by one {end} line")
    return text[:start + len(begin)] + "\n" + new_body.rstrip("\n") + "\n" + text[stop:]


# --- Heartbeat watchdog: a silent rank is named, and the run ends ---


def main_thread_position() -> str:
    """Where the main thread is now: its innermost frame in this script (file:line in function)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    here = os.path.abspath(__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) != here:
        frame = frame.f_back
    return f"line {frame.f_lineno} in {frame.f_code.co_name}" if frame is not None else "outside train_gpt.py"


HEARTBEAT = dict(stopping=threading.Event(), store=None, rank=0)  # the watchdog of this process (one per rank)


def peer_failure(error: BaseException) -> str:
    """One line when a collective failed because another rank's process ended (a node lost, a rank killed): gloo's
    "Connection closed by peer" RuntimeError, NCCL's DistBackendError; "" for anything else. The heartbeat watchdog
    names a silent rank after dist_timeout; a dead one breaks the collective in flight first."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout", "NCCL")
    if isinstance(error, getattr(dist, "DistError", ())) or (isinstance(error, RuntimeError) and
                                                               any(word in text for word in lost)):
        text = re.sub(r"^\[[^\]]*\] ", "", text)  # gloo's [source file:line] prefix
        return f"a collective failed: another rank's process ended or is unreachable ({text[:160]})"
    return ""


def stop_heartbeat_watchdog() -> None:
    """This rank is finishing (done or failed): its watchdog stops, and the others stop watching it."""
    HEARTBEAT["stopping"].set()
    if HEARTBEAT["store"] is not None:
        try:
            HEARTBEAT["store"].set(f"slowrun_heartbeat_done/{HEARTBEAT['rank']}", "1")
        except Exception:  # noqa: BLE001 - the store's host has gone already: nobody is left to watch
            pass


def start_heartbeat_watchdog(rank: int, world_size: int, timeout_s: float) -> threading.Thread:
    """A daemon thread that beats in the process group's own store (torch.distributed's TCPStore) and watches the
    other ranks' beats. A rank that is frozen (SIGSTOP, a stuck driver) or dead stops beating even while the others
    wait silently inside a collective (gloo's default wait is 30 minutes); once one has been silent for timeout_s,
    every watching rank prints one line naming it, its host and pid and where its main thread last was, then ends
    with status 2. The beats run beside the training thread, so slow steps, compilation or a long checkpoint write
    on one rank never count as silence.
    The store itself lives in one process (rank 0's in a launch without torchrun, torchrun's agent otherwise): if
    that one freezes, every store call blocks, so the beats alone would never notice. A second thread holds this
    rank's own deadline: a round of store calls unanswered for timeout_s ends the rank with one line naming the
    store's host (review case g4)."""
    store = dist.distributed_c10d._get_default_store()
    stopping = threading.Event()
    HEARTBEAT.update(store=store, rank=rank, stopping=stopping)
    interval = max(0.05, min(5.0, timeout_s / 5))
    identity = f"{socket.gethostname()} pid {os.getpid()}"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun's agent hosts it
    host = "torchrun's agent" if agent_store else "rank 0"
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    round_state = dict(started=None, host_heard="before its first beat")  # the beat thread's round in flight

    def deadline() -> None:  # touches no store: it runs while the beat thread is stuck in one of its calls
        while not stopping.wait(interval):
            started = round_state["started"]
            if started is not None and time.monotonic() - started > timeout_s and not stopping.is_set():
                heard = "" if agent_store else f"; last heard: {round_state['host_heard']}"
                print(f"error: {host} stopped answering for {time.monotonic() - started:.0f} s: it hosts the process "
                      f"group's store ({address}) that every rank needs (dist_timeout {timeout_s:g} s{heard}); rank "
                      f"{rank} ends the run", file=sys.stderr, flush=True)
                os._exit(2)

    def beat() -> None:
        last_count, last_change = [0] * world_size, [time.monotonic()] * world_size
        while not stopping.is_set():
            try:
                round_state["started"] = time.monotonic()
                store.set(f"slowrun_heartbeat_at/{rank}", f"{identity}, {main_thread_position()}")
                store.add(f"slowrun_heartbeat/{rank}", 1)
                now = time.monotonic()
                for other in range(world_size):
                    count = store.add(f"slowrun_heartbeat/{other}", 0)  # reads the counter without blocking
                    if count != last_count[other]:
                        last_count[other], last_change[other] = count, now
                    elif other != rank and now - last_change[other] > timeout_s and \
                            not store.check([f"slowrun_heartbeat_done/{other}"]):  # a finished rank is quiet
                        key = f"slowrun_heartbeat_at/{other}"
                        where = store.get(key).decode() if store.check([key]) else "before its first beat"
                        print(f"error: rank {other} stopped answering for {now - last_change[other]:.0f} s "
                              f"(dist_timeout {timeout_s:g} s; last heard: {where}); rank {rank} ends the run",
                              file=sys.stderr, flush=True)
                        os._exit(2)
                if rank != 0 and not agent_store and store.check(["slowrun_heartbeat_at/0"]):
                    round_state["host_heard"] = store.get("slowrun_heartbeat_at/0").decode()  # for deadline's line
                round_state["started"] = None
            except Exception as exc:  # noqa: BLE001 - the store itself is gone: its host (rank 0 or torchrun) died
                if stopping.is_set():  # this rank is finishing: the store may close before it
                    return
                print(f"error: the process group's store stopped answering ({type(exc).__name__}: {exc}); "
                      f"rank {rank} ends the run", file=sys.stderr, flush=True)
                os._exit(2)
            time.sleep(interval)

    thread = threading.Thread(target=beat, name="slowrun-heartbeat", daemon=True)
    thread.start()
    threading.Thread(target=deadline, name="slowrun-heartbeat-deadline", daemon=True).start()
    return thread


# --- Progress: counts, durations, peak memory, environment, the ETA, the run's wall clock ---


def format_count(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated by this process, or on CPU its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    except (ImportError, AttributeError):
        return 0


def git_commit() -> str:
    """The commit of the script's folder, with '-dirty' when it has uncommitted changes; '' outside git."""
    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment_report(dist_info: Dist) -> list[str]:
    """Versions and devices, for the log header."""
    lines = [f"python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__} | "
             f"cuda {torch.version.cuda or 'none'} | {platform.platform()}",
             f"world_size {dist_info.world_size} | device {dist_info.device} | cpu threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        lines += [f"gpu {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            lines += ["nvidia-smi:", smi.rstrip()]
        except (OSError, subprocess.SubprocessError):
            lines.append("nvidia-smi: not available")
    return lines


class RunWork:
    """The whole run's ETA: the work left after a step of a member, over the rates measured so far. The newcomer
    review saw `eta 0m07s` with a whole member still to train, and the ETA swing 4x around epoch ends. Two units,
    both per rank:
    - training: tokens computed, padding included (live_micro_steps x device_batch_size x seq_len per step), what a
      step costs; the targets trained on undercount an epoch's short last step;
    - evaluation: targets scored x models scoring them: validations, the running ensemble after each member,
      selection on the fitness slice, the test pass.
    Each rate is cumulative over this process (every timed training interval, every timed evaluation), so one slow
    interval moves the ETA little; before any evaluation is timed, evaluation runs at EVAL_SPEEDUP x training's
    rate. The rest (checkpoints, snapshots, saving members, starting each member, logging: 10% of a micro run) is
    charged to training: the time left for training is scaled by the wall time so far that was neither timed
    evaluation nor compilation, over the training time so far. Members in later rounds (parallel_members trains one
    per group per round) cost what this one costs, distillation's teacher passes included only as they are timed."""
    EVAL_SPEEDUP = 2.5  # forward only: the tiny preset scores val at 2.5x its training tokens/s (2 cores, bench log)

    def __init__(self, hp: Hyperparameters, dist_info: Dist, group_dist: Dist, data: RunData,
                 schedule: MemberSchedule):
        self.hp, self.group_size = hp, hp.parallel_members
        train_data, total_steps = schedule.train_data, schedule.total_steps
        tokens_per_micro_step = train_data.device_batch_size * train_data.seq_len
        compute = [live_micro_steps(train_data, *train_data.locate(step), 0) * tokens_per_micro_step
                   for step in range(total_steps)]  # rank 0 of a group has the most windows of any rank
        passes = [int(schedule.validate_after(done)) for done in range(1, total_steps + 1)]
        # once `done` steps are trained: compute_from[done], the compute of steps done..total-1 (step s makes done
        # s + 1); passes_from[done], the val passes after steps done..total (the one after `done` not yet made)
        self.compute_from = list(itertools.accumulate(reversed(compute), initial=0))[::-1]
        passes_after = list(itertools.accumulate(reversed(passes), initial=0))[::-1]  # [i]: after steps i+1..total
        self.passes_from = [passes_after[max(done - 1, 0)] for done in range(total_steps + 1)]
        self.step_compute = [0] + compute  # [done]: the compute of the step that made `done`
        self.val_per_group_rank = data.val_data.num_targets / group_dist.world_size
        self.val_per_rank = data.val_data.num_targets / dist_info.world_size
        self.candidates_per_member = len(schedule.snapshot_steps) + 1
        final = 0.0  # after the last member: selection (every candidate on the fitness slice, the chosen on val), test
        candidates = self.candidates_per_member * hp.ensemble_size
        if data.fitness_data is not None:
            final += (candidates * data.fitness_data.num_targets / dist_info.world_size
                      + min(candidates, hp.select_top or candidates) * self.val_per_rank)
            candidates = min(candidates, hp.select_top or candidates)
        if data.test_data is not None:
            final += candidates * data.test_data.num_targets / dist_info.world_size
        self.final_eval = final
        self.keep_files = candidate_count(hp) > 1
        self.train_compute = self.train_seconds = self.eval_units = self.eval_seconds = self.excluded = 0.0
        self.started = None  # when the first member began training (MemberProgress.begin)

    def start(self) -> None:
        if self.started is None:
            self.started = time.time()

    def add_train(self, compute: float, seconds: float) -> None:
        self.train_compute, self.train_seconds = self.train_compute + compute, self.train_seconds + seconds

    def add_eval(self, units: float, seconds: float) -> None:
        self.eval_units, self.eval_seconds = self.eval_units + units, self.eval_seconds + seconds

    def left_after(self, member: int, done: int) -> tuple[float, float]:
        """(training compute, evaluation units) left once `member` has trained `done` steps (its validation and
        snapshot at `done` not yet made)."""
        rounds = -(-self.hp.ensemble_size // self.group_size)
        this_round = member // self.group_size
        later_rounds = rounds - this_round - 1
        compute = self.compute_from[done] + later_rounds * self.compute_from[0]
        evals = (self.passes_from[done] + later_rounds * self.passes_from[0]) * self.val_per_group_rank
        if self.keep_files:  # the running ensemble, scored after each member of this round and the later ones
            evals += sum((k + 1) * self.candidates_per_member * self.val_per_rank
                         for k in range(this_round * self.group_size, self.hp.ensemble_size))
        return compute, evals + self.final_eval

    def seconds_left(self, member: int, done: int, train_rate: float | None = None) -> float:
        """The ETA in seconds; train_rate: a provisional training rate while none is measured."""
        compute, evals = self.left_after(member, done)
        train_rate = train_rate or self.train_compute / max(self.train_seconds, 1e-9)
        eval_rate = (self.eval_units / self.eval_seconds if self.eval_seconds > 0
                     else self.EVAL_SPEEDUP * train_rate)
        overhead = 1.0  # wall time per second of training, evaluation and compilation left out
        if self.started is not None and self.train_seconds > 0:
            elapsed = time.time() - self.started - self.eval_seconds - self.excluded
            overhead = max(1.0, elapsed / self.train_seconds)
        return overhead * compute / max(train_rate, 1e-9) + evals / max(eval_rate, 1e-9)


class MemberProgress:
    """A member's progress and timing: the counters a checkpoint carries, the progress and validation lines (log and
    metrics.jsonl), ms/step and tokens/s over each log interval (a compiled first step timed alone), the ETA of the
    whole run (RunWork: this member's rest, the later members, every evaluation), and the paused time (evaluation,
    snapshots, checkpoints) kept out of the training time."""

    def __init__(self, hp: Hyperparameters, dist_info: Dist, log: RunLog, member: int, schedule: MemberSchedule,
                 compiled: bool, work: RunWork):
        self.hp, self.dist_info, self.log, self.schedule, self.compiled = hp, dist_info, log, schedule, compiled
        self.member, self.work = member, work
        self.tag, self.member_field = member_tag(hp, member), {"member": member} if hp.ensemble_size > 1 else {}
        # the data order is a pure function of (seed, epoch), so the step alone says where the data stands
        self.state = dict(step=0, tokens_seen=0, train_seconds=0.0, val_loss=float("nan"), train_loss=float("nan"),
                          loss_sum=0.0, loss_count=0)

    def begin(self) -> None:
        """Starts the clock (after any resume): the loss sum carries on from the checkpoint's."""
        self.interval_start, self.interval_steps, self.interval_tokens = time.time(), 0, 0
        self.interval_compute = 0  # tokens computed, padding included (RunWork)
        self.work.start()
        self.compile_seconds = None  # the first step of a compiled model, timed alone: kept out of ms/step
        self.loss_sum = torch.full((), self.state["loss_sum"], dtype=torch.float64, device=self.dist_info.device)
        # the first step whose loss was not finite (0: none), kept on the device: the loss comes to the host only at
        # progress lines and checkpoints, so a divergence is seen there, and this names its step without a sync
        self.first_non_finite = torch.zeros((), dtype=torch.int64, device=self.dist_info.device)

    def add_loss(self, micro_loss: torch.Tensor) -> None:
        self.loss_sum += micro_loss.detach().double()

    def checkpoint_state(self) -> dict:
        self.state["loss_sum"] = self.loss_sum.item()  # the train loss accumulated since the last progress line
        where = f"the checkpoint of step {self.state['step']}"  # a diverged state is not saved over the last good one
        line = None if math.isfinite(self.state["loss_sum"]) else self.diverged(where, self.state["loss_sum"])
        raise_if_any_rank(self.dist_info, line, f"its train loss is not finite, found at {where}: training "
                                                f"diverged; the last good checkpoint stays")
        return self.state

    def diverged(self, where: str, loss: float, ranks_agree: bool = False) -> str:
        """The line of a non-finite train loss, naming the first step it came at (ranks_agree: every rank of the
        group is here together, so the first over all of them)."""
        first = self.first_non_finite.clone()
        first[first == 0] = torch.iinfo(torch.int64).max
        if ranks_agree and self.dist_info.world_size > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.dist_info.group)
        step = min(int(first.item()), self.state["step"])
        return diverged_line(self.hp, self.log.folder, self.member, self.dist_info.rank,
                             f"the train loss is not finite ({loss}) at step {step}", where)

    @contextmanager
    def paused(self):
        """with progress.paused(): time spent inside is not training time."""
        start = time.time()
        yield
        self.interval_start += time.time() - start

    def _synchronize(self) -> None:
        if self.dist_info.device.type == "cuda":
            torch.cuda.synchronize(self.dist_info.device)

    def step_done(self, done: int, step_targets: int, factor: float) -> None:
        """Counts a finished step; times a compiled first step; every log_every steps, the progress line."""
        hp, state, log, tag = self.hp, self.state, self.log, self.tag
        state["loss_count"] += step_targets
        state["tokens_seen"] += step_targets
        self.interval_steps, self.interval_tokens = self.interval_steps + 1, self.interval_tokens + step_targets
        self.interval_compute += self.work.step_compute[done]
        if self.compiled and self.compile_seconds is None:
            self._synchronize()
            self.compile_seconds = time.time() - self.interval_start
            self.work.excluded += self.compile_seconds
            log.write(f"{tag}compile | first step {self.compile_seconds:.1f}s, compilation included; later ms/step "
                      f"exclude it")
            log.metrics(dict(kind="compile", **self.member_field, step=done,
                             compile_seconds=round(self.compile_seconds, 3)))
            self.interval_start, self.interval_steps, self.interval_tokens = time.time(), 0, 0
            self.interval_compute = 0
        state["step"] = done
        # no sync: the step of the first non-finite loss stays on the device until a progress line or checkpoint
        self.first_non_finite = torch.where((self.first_non_finite == 0) & ~torch.isfinite(self.loss_sum), done,
                                            self.first_non_finite)
        total_steps = self.schedule.total_steps
        if not (done % hp.log_every == 0 or done == 1 or done == total_steps):
            return
        state["train_loss"] = self.dist_info.all_reduce_sum(self.loss_sum).item() / state["loss_count"]
        if not math.isfinite(state["train_loss"]):  # the same value on every rank: all stop here together
            raise ConfigError(self.diverged(f"the progress line of step {done}", state["train_loss"], ranks_agree=True))
        self.loss_sum.zero_()
        state["loss_count"] = 0
        self._synchronize()
        interval_seconds = time.time() - self.interval_start
        interval_steps, interval_tokens = self.interval_steps, self.interval_tokens
        provisional_rate = None  # the compiled first step's rate, until a step without compilation is timed
        if interval_steps == 0:  # right after the compiled first step, nothing else to time: that step's figures
            interval_seconds, interval_steps, interval_tokens = self.compile_seconds, 1, step_targets
            provisional_rate = self.work.step_compute[done] / max(interval_seconds, 1e-9)
        else:
            self.work.add_train(self.interval_compute, interval_seconds)
        state["train_seconds"] += interval_seconds
        ms_per_step = 1000 * interval_seconds / interval_steps
        tokens_per_second = interval_tokens / interval_seconds  # targets trained on (batch_schedule varies them)
        eta = self.work.seconds_left(self.member, done, provisional_rate if self.work.train_seconds == 0 else None)
        memory = peak_memory_bytes(self.dist_info.device)
        epoch_progress = self.schedule.train_data.epoch_position(done)
        log.write(f"{tag}step {done}/{total_steps} | epoch {epoch_progress:.2f} | "
                  f"train_loss {state['train_loss']:.4f} | tokens {format_count(state['tokens_seen'])} | "
                  f"{ms_per_step:.0f} ms/step | {format_count(tokens_per_second)} tok/s | "
                  f"eta {format_duration(eta)} | mem {memory / 2**30:.2f} GiB | lr x{factor:.3f}")
        log.metrics(dict(kind="train", **self.member_field, step=done,
                         epoch=round(epoch_progress, 4), train_loss=state["train_loss"],
                         tokens_seen=state["tokens_seen"], ms_per_step=round(ms_per_step, 2),
                         tokens_per_second=round(tokens_per_second, 1), lr_multiplier=factor,
                         peak_memory_bytes=memory, train_seconds=round(state["train_seconds"], 3),
                         eta_seconds=round(eta, 2)))
        self.interval_start, self.interval_steps, self.interval_tokens = time.time(), 0, 0
        self.interval_compute = 0

    def validate(self, model: nn.Module, val_data: EvalData, done: int) -> None:
        """Scores val; the validation line."""
        start = time.time()
        val_loss = score([model], [1.0], val_data, self.dist_info, self.hp.val_batch_size)[0]
        seconds, epoch_progress = time.time() - start, self.schedule.train_data.epoch_position(done)
        self.work.add_eval(self.work.val_per_group_rank, seconds)
        self.log.write(f"{self.tag}val  step {done}/{self.schedule.total_steps} | epoch {epoch_progress:.2f} | "
                       f"val_loss {val_loss:.4f} | tokens {format_count(self.state['tokens_seen'])} | "
                       f"eval {seconds:.1f}s")
        self.log.metrics(dict(kind="val", **self.member_field, step=done, epoch=round(epoch_progress, 4),
                              val_loss=val_loss, tokens_seen=self.state["tokens_seen"], eval_seconds=round(seconds, 3)))
        self.state["val_loss"] = val_loss


RUN_CLOCK = dict(start=time.time(), before=0.0)  # this run's wall clock: see run_wall_seconds


def run_wall_seconds() -> float:
    """The run's wall-clock seconds: this process's since train() began, plus those of the sessions before a
    --resume up to their last checkpoint or member file (each stores this figure), so wall >= train seconds."""
    return RUN_CLOCK["before"] + time.time() - RUN_CLOCK["start"]


def carry_wall_seconds(earlier: float) -> None:
    """A checkpoint or member file of an earlier session says that session had run `earlier` seconds."""
    RUN_CLOCK["before"] = max(RUN_CLOCK["before"], float(earlier or 0.0))


# --- Data files: the .bin shard format, the tokenizer in its header, checks on the run's files ---

SHARD_MAGIC = 20240520  # modded-nanogpt / llm.c token shard: 256 int32 header, then uint16 tokens
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
# header[3] names the tokenizer that made the shard, as an index here. 0 is GPT-2's BPE, which is also what every
# shard written before the field existed (modded-nanogpt's, FineWeb's, ours) holds there, so old shards read as GPT-2.
# "bpe" is a small BPE of one's own (data/encode.py --train_bpe): header[4] then holds its ranks file's checksum
# (bpe_checksum), so shards of one BPE are refused by a model of another.
SHARD_TOKENIZERS = ("gpt2", "bytes", "bpe")
BYTE_SEPARATOR = 256  # the byte tokenizer's document separator (ids 0-255 are the bytes): opens every document


def bpe_checksum(path: str) -> int:
    """The 31-bit CRC-32 of a BPE ranks file, as shard headers (header[4]) store it."""
    with open(path, "rb") as handle:
        return zlib.crc32(handle.read()) & 0x7FFFFFFF


def write_shard(path: str, tokens: np.ndarray, tokenizer: str = "gpt2", bpe_file: str = "") -> None:
    """Writes tokens (ids < 65,536) as a .bin shard, atomically: a crash leaves no half-written file. A "bpe" shard
    records its ranks file's checksum (bpe_file)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**16):
        raise ValueError(f"{path}: token ids must lie in [0, 65536) to be stored as uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    header[3] = SHARD_TOKENIZERS.index(tokenizer)
    if tokenizer == "bpe":
        header[4] = bpe_checksum(bpe_file)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(tokens.astype("<u2").tobytes())
    os.replace(temporary, path)


def read_shard(path: str, vocab_size: int | None = None) -> np.ndarray:
    """Reads and checks one .bin shard; returns its tokens as uint16. Every problem is a one-line DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    size = os.path.getsize(path)
    if size < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, too small for the {SHARD_HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC} (not a .bin token shard)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: version {header[1]}, expected {SHARD_VERSION}")
    count = int(header[2])
    expected = SHARD_HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(f"{path}: header says {count:,} tokens ({expected:,} bytes) but the file has {size:,} bytes "
                        f"(truncated or corrupt)")
    tokens = np.fromfile(path, dtype="<u2", offset=SHARD_HEADER_BYTES)
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        position = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[position])} at position {position:,} is >= vocab_size "
                        f"{vocab_size}")
    return tokens


def shard_tokenizer(path: str) -> str | None:
    """The tokenizer a shard's header names (header[3]); None when the file is no shard at all (read_shard then
    says what is wrong with it). A "bpe" shard's name carries its ranks checksum: "bpe:123456"."""
    if not os.path.isfile(path) or os.path.getsize(path) < SHARD_HEADER_BYTES:
        return None
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        return None
    if not 0 <= int(header[3]) < len(SHARD_TOKENIZERS):
        raise DataError(f"{path}: header[3] = {int(header[3])} names no known tokenizer (0 gpt2, 1 bytes, 2 bpe)")
    name = SHARD_TOKENIZERS[int(header[3])]
    return f"bpe:{int(header[4])}" if name == "bpe" else name


def check_shard_tokenizers(hp: Hyperparameters, patterns: list[str]) -> None:
    """Refuses, in one line, a shard made by another tokenizer than the run's: a byte shard fed to a GPT-2 model
    would train without any error (byte ids are valid GPT-2 ids) and mean nothing."""
    if hp.tokenizer == "bpe" and not os.path.isfile(hp.bpe_file):
        raise DataError(f"--bpe_file {hp.bpe_file!r}: file not found (the BPE ranks file the shards were made with)")
    expected = f"bpe:{bpe_checksum(hp.bpe_file)}" if hp.tokenizer == "bpe" else hp.tokenizer
    for path in sorted(path for pattern in patterns if pattern for path in glob.glob(pattern)):
        made_by = shard_tokenizer(path)
        if made_by is None or made_by == expected:
            continue
        if made_by.split(":")[0] == hp.tokenizer:  # both "bpe", other checksums
            raise DataError(f"{path}: vocab/tokenizer mismatch: the shard was made by another BPE (ranks checksum "
                            f"{made_by[4:]}) than --bpe_file {hp.bpe_file} (checksum {expected[4:]})")
        made_by = made_by.split(":")[0]
        raise DataError(f"{path}: vocab/tokenizer mismatch: the shard was made by the {made_by} tokenizer, this "
                        f"run expects {hp.tokenizer} (vocab_size {hp.vocab_size}); use --tokenizer {made_by} with "
                        f"its vocabulary (--preset mini for bytes, mini_bpe for the mini BPE) or shards made for "
                        f"{hp.tokenizer}")


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def check_data_files(hp: Hyperparameters, need_train: bool = True) -> None:
    """Refuses, in one line, what would otherwise train silently: a file in two sets (the same path, or globs that
    overlap), two sets holding identical content (val copied in as train), a shard with no tokens, and a shard with
    no <|endoftext|> (bos_id) in a training run, where every document starts with one (data/README.md). Runs after read_shard has
    checked each file's header."""
    sets = ([("train", hp.train_files)] if need_train else []) + [("validation", hp.val_files)] + \
        ([("test", hp.test_files)] if hp.test_files else [])
    flag = dict(train="--train_files", validation="--val_files", test="--test_files")
    owner: dict[str, str] = {}  # real path -> its set
    sizes: dict[int, list[tuple[str, str]]] = {}
    for what, pattern in sets:
        for path in sorted(glob.glob(pattern)):
            real = os.path.realpath(path)
            if owner.get(real, what) != what:
                raise DataError(f"{path} is both a {owner[real]} file and a {what} file ({flag[owner[real]]} "
                                f"and {flag[what]} overlap): the {what} score would leak into training or "
                                f"selection")
            if real in owner:
                continue
            owner[real] = what
            tokens = np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES) \
                if os.path.getsize(path) > SHARD_HEADER_BYTES else np.zeros(0, np.uint16)
            if tokens.size == 0:
                raise DataError(f"{path}: the header is valid but the shard holds 0 tokens")
            if need_train and not (tokens == hp.bos_id).any():  # --eval_only scores members of other bos_ids
                raise DataError(f"{path}: no <|endoftext|> (bos_id {hp.bos_id}) in {tokens.size:,} tokens; every "
                                f"document must start with one (a shard of another tokenizer, or a wrong --bos_id?)")
            sizes.setdefault(os.path.getsize(path), []).append((what, path))
    for same_size in sizes.values():  # identical content needs an identical size: hash only those
        if len({what for what, _ in same_size}) > 1:
            seen: dict[str, tuple[str, str]] = {}
            for what, path in same_size:
                earlier = seen.setdefault(file_digest(path), (what, path))
                if earlier[0] != what:
                    raise DataError(f"{path} ({what}) has the same content as {earlier[1]} ({earlier[0]}): the "
                                    f"{what} score would leak")


def public_val_status(hp: Hyperparameters) -> str:
    """Whether this run's val tokens are the public records' (records/TRACKS.md F23), from data/fineweb.py's
    manifest.json beside the val file: the val .bin must still hash as the manifest says, and the manifest's slowrun
    export must have equalled slowrun's published fineweb_val.pt sha256."""
    paths = sorted(glob.glob(hp.val_files))
    manifest_path = os.path.join(os.path.dirname(paths[0]), "manifest.json") if len(paths) == 1 else ""
    if not os.path.isfile(manifest_path):
        return "val = public: unknown (no manifest.json of data/fineweb.py beside the val file)"
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        recorded = manifest["splits"]["val"]["sha256"]
        export = manifest.get("export", {}).get("slowrun", {}).get("val")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"val = public: unknown ({manifest_path} unreadable: {type(exc).__name__})"
    digest = hashlib.sha256()
    with open(paths[0], "rb") as handle:
        handle.seek(SHARD_HEADER_BYTES)
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    if digest.hexdigest() != recorded:
        return f"val = public: no ({paths[0]} no longer hashes as {manifest_path} records)"
    if not isinstance(export, dict) or "matches_published" not in export:
        return "val = public: unknown (run python data/fineweb.py --export slowrun to compare with the public hash)"
    if export["matches_published"]:
        return "val = public: yes (the slowrun export equals the published fineweb_val.pt sha256 6868ed37...8573b1)"
    return "val = public: NO (the slowrun export differs from the published fineweb_val.pt sha256 6868ed37...8573b1)"


# --- A run's first and last words for a newcomer: too little data, the loss plot, text samples, experiment tracking ---

MIN_STEPS_PER_EPOCH = 10  # below this an epoch is too few updates for the recipe's schedules (warmdown, LR) to mean much


def data_size_warnings(hp: Hyperparameters, train_tokens: int) -> list[str]:
    """Warnings for a train set too small for the batch: a model that takes a handful of steps ends worse than the
    unigram baseline, and nothing else would say why (your own 4k-token text with the default 8,192-token batch)."""
    windows = math.ceil(train_tokens / (hp.seq_len + 1))
    steps_per_epoch = math.ceil(windows / max(1, hp.batch_tokens // hp.seq_len))
    hint = f"lower --batch_tokens (a multiple of seq_len {hp.seq_len}) or add data"
    warnings = []
    if train_tokens < hp.batch_tokens:
        warnings.append(f"warning: the train set ({train_tokens:,} tokens) is smaller than one batch "
                        f"({hp.batch_tokens:,} tokens): every step sees all of it, padded; {hint}")
    if steps_per_epoch < MIN_STEPS_PER_EPOCH:
        warnings.append(f"warning: only {steps_per_epoch} optimizer step(s) per epoch "
                        f"({steps_per_epoch * hp.num_epochs} in all), fewer than {MIN_STEPS_PER_EPOCH}: too few "
                        f"updates to learn much; {hint}, or raise --num_epochs")
    return warnings


def unigram_comparison(loss: float, unigram: float) -> str:
    """'0.48 nats below unigram 7.9503': a model that does not beat the context-free baseline has learned nothing."""
    gap = unigram - loss
    return f"{abs(gap):.2f} nats {'below' if gap >= 0 else 'ABOVE'} unigram {unigram:.4f}"


def write_loss_plot(folder: str, title: str, unigram: float):
    """loss.png in the run folder from its metrics.jsonl: train and val loss against tokens trained on (one curve
    each per member), the unigram baseline as a dashed line, the final ensemble's val loss dotted. Returns the
    matplotlib Figure (the tests read its lines), or None without matplotlib (a warning says so; the run stands)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("warning: matplotlib is not installed, so no loss.png (pip install matplotlib)", file=sys.stderr)
        return None
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    members = sorted({row.get("member", 0) for row in rows if row["kind"] in ("train", "val")})
    for member in members:
        suffix = f" (member {member})" if len(members) > 1 else ""
        for kind, style in (("train", "-"), ("val", "o-")):
            points = [(row["tokens_seen"], row[f"{kind}_loss"]) for row in rows
                      if row["kind"] == kind and row.get("member", 0) == member]
            if points:
                axes.plot(*zip(*points), style, label=f"{kind}{suffix}", markersize=4)
    ensemble = [row["val_loss"] for row in rows if row["kind"] == "ensemble"]
    if len(ensemble) > 1:
        axes.axhline(ensemble[-1], linestyle=":", color="black", label=f"ensemble val {ensemble[-1]:.4f}")
    axes.axhline(unigram, linestyle="--", color="gray", label=f"unigram baseline {unigram:.4f}")
    axes.set(xlabel="tokens trained on (per member)", ylabel="loss (nats/token)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "loss.png"), dpi=100)
    return figure


def decode_tokens(token_ids: list[int], vocab_size: int, tokenizer: str = "gpt2", bpe_file: str = "") -> str:
    """The text of the tokens: UTF-8 bytes for the byte tokenizer and a small BPE (the separator shown as a
    newline), GPT-2 text from data/encode.py's bundled BPE (no download), or the ids themselves where that is
    unavailable or the vocabulary is not GPT-2's (the tests' toy languages)."""
    table = token_bytes_table(tokenizer, bpe_file) if tokenizer in ("bytes", "bpe") else None
    if table is not None:
        return repr(b"".join(b"\n" if t == BYTE_SEPARATOR else table.get(t, b"") for t in token_ids)
                    .decode("utf-8", errors="replace"))
    try:
        spec = importlib.util.spec_from_file_location(
            "slowrun_encode", os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "encode.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        encoding = module.gpt2_encoding(module.BUNDLED_VOCAB)  # offline: the BPE file bundled in data/
        if vocab_size < encoding.n_vocab:
            raise ValueError("not the GPT-2 vocabulary")
        return repr(encoding.decode([t for t in token_ids if t < encoding.n_vocab]))
    except Exception:  # noqa: BLE001 - any trouble decoding: show the ids, the samples stay useful
        return " ".join(str(t) for t in token_ids)


@torch.no_grad()
def next_token_log_probs(models: list[nn.Module], weights: list[float], mode: str, context: torch.Tensor,
                         seq_len: int) -> torch.Tensor:
    """The (ensemble) model's log-probabilities (B, V) of the token after each row of context (B, T), from its last
    seq_len tokens; only the last position's logits are made (no (T, vocab) tensor). The sampling step of
    sample_continuations and of bench/synthetic_text.py."""
    window = context[:, -seq_len:]
    return ensemble_log_probs((model.head(model.features(window)[:, -1:]).float() for model in models),
                              weights, mode)[:, -1]


@torch.no_grad()
def sample_continuations(models: list[nn.Module], weights: list[float], mode: str, val_tokens: np.ndarray,
                         hp: Hyperparameters, device: torch.device, prompts: int = 3, prompt_len: int = 32,
                         top_k: int = 50, temperature: float = 0.8) -> list[dict]:
    """--sample_tokens N: the first prompt_len tokens of the first val documents, each continued by N tokens of the
    (ensemble) model, greedily and by top-k sampling at a temperature from a generator seeded by --seed, so a seed
    gives the same text every time. Only the last position's logits are made per token (no (T, vocab) tensor)."""
    starts = document_starts(val_tokens, hp.bos_id)[:prompts]
    if starts.size == 0:
        starts = np.array([0])
    batch = torch.from_numpy(np.stack([val_tokens[s:s + prompt_len].astype(np.int64) for s in starts
                                       if s + prompt_len <= val_tokens.size] or [val_tokens[:prompt_len].astype(np.int64)]))
    generator = torch.Generator(device="cpu").manual_seed(hp.seed)
    states = [model.training for model in models]
    for model in models:
        model.eval()
    results = {}
    for how in ("greedy", f"top-{top_k} T={temperature}"):
        context = batch.to(device)
        for _ in range(hp.sample_tokens):
            with autocast_context(device):
                log_probs = next_token_log_probs(models, weights, mode, context, hp.seq_len).float().cpu()
            if how == "greedy":
                choice = log_probs.argmax(-1)
            else:
                top = torch.topk(log_probs / temperature, min(top_k, log_probs.size(-1)), dim=-1)
                picked = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
                choice = top.indices.gather(-1, picked).squeeze(-1)
            context = torch.cat([context, choice.to(device).unsqueeze(-1)], dim=1)
        results[how] = context[:, batch.size(1):].cpu().tolist()
    for model, state in zip(models, states):
        model.train(state)
    return [dict(prompt=batch[i].tolist(), **{how: rows[i] for how, rows in results.items()})
            for i in range(batch.size(0))]


def sample_lines(samples: list[dict], vocab_size: int, tokenizer: str = "gpt2", bpe_file: str = "") -> list[str]:
    lines = []
    for number, sample in enumerate(samples):
        lines.append(f"sample {number} | prompt {decode_tokens(sample['prompt'], vocab_size, tokenizer, bpe_file)}")
        lines += [f"  {how}: {decode_tokens(tokens, vocab_size, tokenizer, bpe_file)}"
                  for how, tokens in sample.items() if how != "prompt"]
    return lines


def import_wandb(project: str):
    """The wandb module for --wandb PROJECT, or a one-line ConfigError when it is not installed (it is never a
    required dependency; checked before the run folder is made)."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"--wandb {project}: the wandb package is not installed (pip install wandb, "
                          f"or drop --wandb)") from None
    return wandb


def tracker_row(row: dict) -> dict:
    """A metrics.jsonl row as wandb takes it: the numbers, named '<kind>/<field>' (train/train_loss, val/val_loss)."""
    kind = row.get("kind", "metrics")
    return {f"{kind}/{key}": value for key, value in row.items()
            if key != "kind" and isinstance(value, (int, float)) and not isinstance(value, bool)}


# --- Record comparison and --eval_only: FLOPs per token against the public record, scoring saved members ---


def build_model_meta(hp: Hyperparameters) -> GPT:
    """The model on the meta device: its shapes and parameter count without memory or work."""
    with torch.device("meta"):
        return GPT(model_config(hp))


def mean_attended_keys(seq_len: int, window: int) -> float:
    """Keys a query attends to on average under a causal window of `window` keys: mean over i of min(i + 1, window)."""
    width = min(window, seq_len)
    return (seq_len + 1) / 2 if width >= seq_len else width - width * (width - 1) / (2 * seq_len)


def training_flops_per_token(hp: Hyperparameters, looped: bool = False, stage: int | None = None) -> float:
    """Training FLOPs per token as the public records' estimate_flops counts them: 6 x (parameters less the embedding,
    the value-embedding tables and the resid/x0/skip scalars) + 12 x n_embd x (mean attended keys) per layer;
    looped=True adds each replayed layer's 6 x its parameters and its attention. With a window schedule: the windows
    of `stage` (default: the first, or with looped=True the stage of loop_start_epoch, where the replay starts)."""
    model = build_model_meta(hp)
    lookups = ("value_embeds.",)  # the baseline record's value-embedding tables: lookups, excluded as its formula does
    if hp.window_schedule:
        stages = parse_window_schedule(hp.window_schedule)
        loop_stage = window_schedule_stage(stages, hp.loop_start_epoch or 1) if looped else 0
        set_window_schedule_stage(model, loop_stage if stage is None else stage)
    excluded = model.wte.weight.numel() + sum(p.numel() for name, p in model.named_parameters()
                                               if scalar_role(name) in ("resid", "x0") or name.startswith(lookups))
    model.loop_active = looped
    order = model.layer_order()
    windows = model.window_sizes or [hp.seq_len] * hp.n_layer
    replayed = sum(sum(p.numel() for p in model.blocks[layer].parameters()) for layer in order[hp.n_layer:]) \
        if len(order) > hp.n_layer else 0
    attention = sum(12 * hp.n_embd * mean_attended_keys(hp.seq_len, windows[layer]) for layer in order)
    # the 15min record's recurrence (looped=True: all passes): the whole stack's parameters and attention again per
    # extra pass, as its estimate_flops counts them (the no-grad passes included at the full 6 x)
    passes = hp.recurrence if looped else 1
    stack = sum(p.numel() for layer in order for p in model.blocks[layer].parameters())
    return 6 * (sum(p.numel() for p in model.parameters()) - excluded + replayed + (passes - 1) * stack) \
        + passes * attention


def preset_record(name: str) -> str:
    """One line: which public record a preset reproduces (run.sh prints it; an unknown preset is a ConfigError)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    track = PRESET_ALIASES.get(name, name)
    record = PUBLIC_RECORDS.get(track)
    head = f"preset {name} is {track}" if track != name else f"preset {name}"
    return head + (f": reproduces the {track} record {record['figure']} ({record['script']})" if record
                   else ": not a public record")


def preset_record_lines(hp: Hyperparameters, n_params: int) -> list[str]:
    """The log's comparison of this run's model with the public record its preset reproduces (none without one)."""
    record = PUBLIC_RECORDS.get(PRESET_ALIASES.get(hp.preset, hp.preset))
    if record is None:
        return []
    lines = [preset_record(hp.preset)]
    looped = (f"; {training_flops_per_token(hp, True) / 1e9:.2f} G with looped layers or recurrence on"
              if hp.loop_repeats or hp.recurrence > 1 else "")
    record_looped = f" ({record['flops_looped'] / 1e9:.2f} G looped)" if "flops_looped" in record else ""
    note = f"; {record['flops_note']}" if "flops_note" in record else ""
    lines.append(f"model vs record: {n_params:,} vs {record['parameters']:,} parameters | training "
                 f"{training_flops_per_token(hp) / 1e9:.2f} G FLOPs/token{looped} vs {record['flops'] / 1e9:.2f} G"
                 f"{record_looped} (public estimate_flops formula{note})")
    if hp.window_schedule:  # the windows, so the attention FLOPs, change per stage (the 2h record's estimate_flops too)
        count = len(parse_window_schedule(hp.window_schedule))
        lines.append("window stages: " + " / ".join(f"{training_flops_per_token(hp, stage=stage) / 1e9:.2f}"
                                                    for stage in range(count)) + " G FLOPs/token")
    return lines


def score_saved_members(hp: Hyperparameters, dist_info: Dist) -> dict:
    """--eval_only: the ensemble of saved members (members/member_NN.pt files or globs) on val, and on test when
    given; nothing is trained. Each member alone, then all of them with --ensemble_weights or uniform weights."""
    # in the order given (a glob's matches in name order), each file once: --ensemble_weights follow this order
    paths = list(dict.fromkeys(path for pattern in hp.eval_only.split(",") if pattern
                               for path in (sorted(glob.glob(pattern)) or [pattern])))
    # host memory, each parked (split over the ranks) as it comes; one on the device at a time
    on_disk = eval_only_on_disk(hp, paths, dist_info)  # or each kept as its file (candidates_on_disk), read per use
    loaded = [(keep_frozen(model, frozen_store(hp, dist_info), on_disk, path, 0, teaches=False), info)
              for path, (model, info) in ((path, load_member(path, dist_info.host)) for path in paths)]
    models = [model for model, _ in loaded]
    shapes = {(info["config"]["seq_len"], info["config"]["vocab_size"]) for _, info in loaded}
    if len(shapes) > 1:
        raise ConfigError(f"--eval_only: the members differ in (seq_len, vocab_size): {sorted(shapes)}")
    seq_len, vocab_size = shapes.pop()  # score with the members' own context length and vocabulary
    hp = dataclasses.replace(hp, seq_len=seq_len, vocab_size=vocab_size,  # and the shards' tokenizer (old files: gpt2)
                             tokenizer=loaded[0][1]["tokenizer"])
    weights = parse_weights(hp.ensemble_weights, len(models)) if hp.ensemble_weights else [1 / len(models)] * len(models)
    data = load_run_data(hp, need_train=False)
    result = dict(members=paths, weights=weights, mode=hp.ensemble_mode, member_val_losses=[])
    for path, model in zip(paths, models):
        loss = score([model], [1.0], data.val_data, dist_info, hp.val_batch_size)[0]
        result["member_val_losses"].append(loss)
        if dist_info.is_main:
            print(f"member {path} | val_loss {loss:.4f}", flush=True)
    result["val_loss"] = score(models, weights, data.val_data, dist_info, hp.val_batch_size, hp.ensemble_mode)[0]
    result["test_loss"] = score(models, weights, data.test_data, dist_info, hp.val_batch_size,
                                hp.ensemble_mode)[0] if data.test_data else None
    if dist_info.is_main:
        print(f"ensemble of {len(models)} ({hp.ensemble_mode}) | val_loss {result['val_loss']:.4f}" +
              (f" | test_loss {result['test_loss']:.4f}" if result["test_loss"] is not None else ""), flush=True)
        print(json.dumps(result), flush=True)
    return result


# --- Command line: --help (a map of the flags), --help NAME, --explain (what a preset runs) ---


def field_docs() -> list[dict]:
    """Every Hyperparameters field in source order (Recipe's, then the run settings'): its group (the `# --- group ---`
    header above it), name, default as written, and comment (continuation lines included), read from the classes'
    source: the comments are the documentation, so --help cannot drift from them."""
    names = {f.name for f in dataclasses.fields(Hyperparameters)}
    rows, group, header_open = [], "", False
    source = inspect.getsource(Recipe).splitlines()[1:] + inspect.getsource(Hyperparameters).splitlines()[1:]
    for line in source:  # the recipe's groups, then the run settings'
        if line.startswith("class "):
            group = ""
        text = line.strip()
        if text.startswith("# ---"):
            group, header_open = text[5:].rstrip("- ").strip(), not text.endswith("---")
            continue
        if text.startswith("#"):
            if header_open:  # a group header running over two lines
                group, header_open = f"{group} {text[1:].rstrip('- ').strip()}", not text.endswith("---")
            elif rows:
                rows[-1]["comment"] += " " + text[1:].strip()
            continue
        match = re.match(r"(\w+): [^=]+= (.*?)(?:  # (.*))?$", text)
        if match and match.group(1) in names:
            rows.append(dict(group=group or "preset", name=match.group(1), default=match.group(2),
                             comment=match.group(3) or ""))
    return rows


def one_line(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def usage(name: str = "") -> str:
    """--help: the flags grouped as the class groups them, each with its default and the start of its comment;
    --help NAME: that field whole (group, default, comment, the presets that set it)."""
    docs = field_docs()
    if name:
        row = next((row for row in docs if row["name"] == name.lstrip("-")), None)
        if row is None:
            close = difflib.get_close_matches(name.lstrip("-"), [r["name"] for r in docs], n=1)
            raise ConfigError(f"--help: no flag --{name.lstrip('-')}" +
                              (f"; did you mean --{close[0]}?" if close else ""))
        presets = ", ".join(f"{preset} ({values[row['name']]!r})" for preset, values in PRESETS.items()
                            if row["name"] in values) or "none"
        kind = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}[row["name"]]
        rule = f" (must {NUMBER_KINDS[kind][0]})" if kind in NUMBER_KINDS else ""
        return (f"--{row['name']} (group: {row['group']})\ndefault: {row['default']}{rule}\n{row['comment']}\n"
                f"set by presets: {presets}")
    lines = [__doc__.strip(), "", "Flags: --name value (or --name=value); a preset applies first, then the flags.",
             "python train_gpt.py --help NAME: one flag whole; --preset NAME --explain: what a preset runs.", ""]
    group = None
    for row in docs:
        if row["group"] != group:
            group = row["group"]
            lines += ["", f"{group}:"]
        lines.append(f"  --{row['name']:<26} {one_line(row['default'], 22):<22} {one_line(row['comment'], 90)}")
    lines += ["", "Presets (python train_gpt.py --preset NAME --explain):"]
    lines += [f"  {name:<10} {one_line(preset_record(name), 100)}" if name in PUBLIC_RECORDS or name == "slowrun"
              else f"  {name}" for name in PRESETS]
    return "\n".join(lines)


RECIPE_END = "# Harness:"  # the banner: what a flag acts on above it is the recipe


@functools.lru_cache(maxsize=1)
def recipe_uses() -> dict[str, list[tuple[str, str]]]:
    """field name -> [(section, function)] of the recipe functions above the Harness banner that read it (as an
    attribute, hp.name / config.name, or a key, group["name"]), validation and configuration plumbing left out."""
    source = open(os.path.abspath(__file__), encoding="utf-8").read()
    lines = source.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(RECIPE_END))
    banners = [(i + 1, line[2:].split(":")[0]) for i, line in enumerate(lines[:end])
               if line.startswith("# ") and i and lines[i - 1].startswith("# ---")]
    recipe_uses.banners = [(title, line) for line, title in banners]
    plumbing = ("check_", "require", "parse_args", "_parse_value", "model_config", "Hyperparameters", "GPTConfig")
    uses: dict[str, list[tuple[str, str]]] = {}

    def visit(node, qualified):
        section = [title for line, title in banners if line <= node.lineno][-1] if banners else ""
        for inner in ast.walk(node):
            key = inner.attr if isinstance(inner, ast.Attribute) else (
                inner.slice.value if isinstance(inner, ast.Subscript) and isinstance(inner.slice, ast.Constant)
                and isinstance(inner.slice.value, str) else None)
            if key and (section, qualified) not in uses.setdefault(key, []):
                uses[key].append((section, qualified))

    for node in ast.parse(source).body:
        if node.lineno > end or not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or \
                node.name.startswith(plumbing):
            continue
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef):
                    visit(method, f"{node.name}.{method.name}")
        else:
            visit(node, node.name)
    return uses


def stage_table(hp: Hyperparameters) -> list[str]:
    """The run's epoch-aligned schedules as the stages() table a preset writes (its inverse): a row wherever the
    windows, the looped layers, a weight-decay knot or the batch multiplier change; [] when none is set."""
    epochs, columns = hp.num_epochs, {}
    if hp.window_schedule:
        stages = parse_window_schedule(hp.window_schedule)
        columns["windows"] = [",".join(str(w) for w in stages[window_schedule_stage(stages, e + 1)][2:])
                              for e in range(epochs)]
    if hp.loop_repeats and hp.loop_start_epoch:
        columns["looped_layers"] = ["on" if e + 1 >= hp.loop_start_epoch else "off" for e in range(epochs)]
    knots = wd_point_knots(hp) if hp.wd_schedule == "points" else []
    if knots and all(k[0] == int(k[0]) for k in knots):  # a row per knot-to-knot stretch: start -> end multiplier
        at = [float(np.interp(e, [k[0] for k in knots], [k[1] for k in knots])) for e in range(epochs + 1)]
        bounds = [k[0] for k in knots if 0 < k[0] < epochs]
        columns["weight_decay"] = [f"{at[int(max([0] + [b for b in bounds if b <= e]))]:g}->"
                                   f"{at[int(min([epochs] + [b for b in bounds if b > e]))]:g}" for e in range(epochs)]
    multipliers = batch_schedule(hp)
    if multipliers:
        columns["batch"] = [f"{multipliers[min(e, len(multipliers) - 1)]:g}" for e in range(epochs)]
    if not columns:
        return []
    cells = [tuple(column[e] for column in columns.values()) for e in range(epochs)]
    starts = [e for e in range(epochs) if e == 0 or cells[e] != cells[e - 1]]
    rows = [["epochs", *columns]] + [[f"{a}-{b}", *cells[a]] for a, b in zip(starts, starts[1:] + [epochs])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def explain(hp: Hyperparameters) -> str:
    """--explain: the resolved recipe without building anything: only the settings that differ from the plain model
    (the Hyperparameters defaults), grouped as the class groups them, each with its comment (where the comment
    names the trick's paper or record) and the recipe sections and functions it acts in."""
    plain, docs, uses = Hyperparameters(), field_docs(), recipe_uses()
    changed = [row for row in docs if row["name"] != "preset" and getattr(hp, row["name"]) != getattr(plain, row["name"])]
    title = preset_record(hp.preset) if hp.preset else "no preset"
    lines = [title, f"{len(changed)} of {len(docs) - 1} settings differ from the plain model:"]
    group, sections = None, {}
    for row in changed:
        if row["group"] != group:
            group = row["group"]
            lines += ["", f"{group}:"]
        value, default = getattr(hp, row["name"]), getattr(plain, row["name"])
        lines.append(f"  --{row['name']} {value!r}  (plain: {default!r})")
        lines.append(f"      {one_line(row['comment'], 110)}")
        where = uses.get(row["name"], [])
        if where:
            lines.append(f"      acts in: {', '.join(function for _, function in where[:5])}"
                         f"{f' and {len(where) - 5} more' if len(where) > 5 else ''}")
        for section, function in where:
            sections.setdefault(section, set()).add(function)
    table = stage_table(hp)
    if table:
        lines += ["", "training stages (stages(): a row per stretch of epochs, 0-based, the end excluded; each column "
                  "a flag above):", *[f"  {row}" for row in table]]
    lines += ["", "Sections of train_gpt.py these settings switch on (functions that read them):"]
    order = {section: index for index, (section, _) in enumerate(recipe_uses.banners)}
    lines += [f"  {section}: {len(functions)} function(s)"
              for section, functions in sorted(sections.items(), key=lambda item: order.get(item[0], 0))]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
