#!/usr/bin/env python3
"""PyTorch references for fathom's training engine, made on the GPU machine (PyTorch +
transformers there; never part of fathom). Run by scripts/device-train-reference.sh.

  grads   whole-model gradients of v3-tiny-mtp: HF transformers' DeepseekV3ForCausalLM for the
          main model, its decoder-layer class for the MTP module, autograd in float64 with respect
          to every tensor of the checkpoint under its published name; the objective is fathom's
          (src/train/model_grad.h): next-token cross-entropy + α · the sequence-wise balance loss
          of every MoE layer + λ · the MTP cross-entropy, per sequence, averaged over the batch.
  train   50 AdamW steps of v3-tiny in float32 from the fixture weights on a fixed token stream,
          exactly as `fathom train` takes them (windows, schedule, clipping, the expert-bias update).
  check   a checkpoint written by fathom loads in transformers and gives fathom's logits.

Each mode first checks that its PyTorch model reproduces the fixture's reference logits (and MTP
logits), so a wrong weight mapping cannot pass unnoticed.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def rel(a, b):
    return (a.double() - b.double()).norm().item() / max(b.double().norm().item(), 1e-300)


def load_hf(path, dtype, config=None):
    # eager attention and the experts' plain loop (the grouped-mm kernel has no float64)
    kw = dict(attn_implementation="eager", experts_implementation="eager")
    if config is not None:
        kw["config"] = config
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kw)
    return m.to(dtype)


def published(path):
    """The checkpoint's tensors under their published names (float)."""
    files = [f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors")]
    out = {}
    for f in sorted(files):
        out.update(load_file(os.path.join(path, f)))
    return out


class Mapping:
    """Builds each parameter and buffer of an HF module from the published tensors (leaves), so that
    autograd differentiates with respect to the published tensors themselves. rename(hf_name) gives
    the published name of a direct tensor; fused expert tensors (newer transformers) are recognised
    by trying the layouts that reproduce the loaded values."""

    def __init__(self, module, pub, rename):
        self.plan = {}
        state = dict(module.named_parameters())
        state.update(dict(module.named_buffers()))
        for name, t in state.items():
            if name.endswith("inv_freq") or "rotary" in name:
                continue
            src = rename(name)
            if src in pub:
                self.plan[name] = ("direct", src)
                continue
            fused = self._fused(name, t, pub, rename)
            if fused is None:
                raise SystemExit(f"train-reference: no published tensor for HF parameter {name} {tuple(t.shape)}")
            self.plan[name] = fused

    def _fused(self, name, t, pub, rename):
        for suffix, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            if not name.endswith("experts." + suffix):
                continue
            base = rename(name[: -len(suffix)])  # "...mlp.experts."
            E = t.shape[0]
            for transpose in (False, True):
                def build(leaves, base=base, parts=parts, E=E, transpose=transpose):
                    mats = []
                    for e in range(E):
                        m = torch.cat([leaves[f"{base}{e}.{p}.weight"] for p in parts], 0)
                        mats.append(m.t() if transpose else m)
                    return torch.stack(mats)
                try:
                    cand = build({k: v.to(t.dtype) for k, v in pub.items()})
                except KeyError:
                    return None
                if cand.shape == t.shape and torch.equal(cand, t.detach().cpu()):
                    return ("build", build)
        return None

    def tensors(self, leaves):
        out = {}
        for name, (kind, how) in self.plan.items():
            if kind == "direct" and how not in leaves:
                continue  # not trained (the expert bias): the module keeps the loaded value
            out[name] = leaves[how] if kind == "direct" else how(leaves)
        return out


def rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class Objective:
    """fathom's training objective over one sequence, with the published tensors as leaves."""

    def __init__(self, path, dtype, alpha, lam):
        self.cfg = AutoConfig.from_pretrained(path)
        self.pub = {k: v.to(dtype) for k, v in published(path).items() if not k.endswith("_scale_inv")}
        self.dtype, self.alpha, self.lam = dtype, alpha, lam
        self.main = load_hf(path, dtype).eval()
        L = self.cfg.num_hidden_layers
        self.main_map = Mapping(self.main, self.pub, lambda n: n)
        self.mtp = None
        if getattr(self.cfg, "num_nextn_predict_layers", 0) and lam > 0:
            c1 = AutoConfig.from_pretrained(path)
            c1.num_hidden_layers = 1
            c1.first_k_dense_replace = 0
            c1.num_nextn_predict_layers = 0
            c1._attn_implementation = "eager"
            c1._experts_implementation = "eager"
            try:
                self.mtp = AutoModelForCausalLM.from_config(c1, attn_implementation="eager", experts_implementation="eager")
            except TypeError:
                self.mtp = AutoModelForCausalLM.from_config(c1)
            self.mtp = self.mtp.to(dtype).eval()
            p = f"model.layers.{L}."

            def rename(n):
                if n.startswith("model.layers.0."):
                    return p + n[len("model.layers.0."):]
                return {"model.norm.weight": p + "shared_head.norm.weight", "lm_head.weight": p + "shared_head.head.weight",
                        "model.embed_tokens.weight": p + "embed_tokens.weight"}.get(n, n)
            # the module's random init is replaced by the published tensors: load them so that the
            # fused-expert layouts can be recognised by value
            sd = {}
            for n, t in list(self.mtp.named_parameters()) + list(self.mtp.named_buffers()):
                if rename(n) in self.pub:
                    sd[n] = self.pub[rename(n)]
            self.mtp.load_state_dict(sd, strict=False)
            self._load_fused(self.mtp, rename)
            self.mtp_map = Mapping(self.mtp, self.pub, rename)
            self.mtp_prefix = p
        self.routes = []
        for model in [self.main] + ([self.mtp] if self.mtp is not None else []):
            for name, mod in model.named_modules():
                if name.endswith("mlp.gate"):
                    mod.register_forward_hook(self._hook)

    def _load_fused(self, model, rename):
        for n, t in model.named_parameters():
            for suffix, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                if n.endswith("experts." + suffix):
                    base = rename(n[: -len(suffix)])
                    mats = [torch.cat([self.pub[f"{base}{e}.{p}.weight"] for p in parts], 0) for e in range(t.shape[0])]
                    s = torch.stack(mats)
                    with torch.no_grad():
                        t.copy_(s if s.shape == t.shape else s.transpose(1, 2))

    def _hook(self, mod, inputs, output):
        h = inputs[0].reshape(-1, self.cfg.hidden_size)
        logits = F.linear(h.to(self.dtype), mod.weight.to(self.dtype))
        with torch.no_grad():  # the experts the model itself chose (the router's integer output)
            outs = output if isinstance(output, (tuple, list)) else (output,)
            ints = [o for o in outs if torch.is_tensor(o) and o.dtype in (torch.int64, torch.int32)]
            if ints:
                ids = ints[0]
            else:
                ids = mod.get_topk_indices(logits.float().sigmoid())
        self.routes.append((logits, ids.reshape(-1, self.cfg.num_experts_per_tok)))

    def balance(self):
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        total = 0
        for logits, ids in self.routes:
            T = logits.shape[0]
            s = logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(-1)
            sn = s / s.sum(-1, keepdim=True)
            f = torch.bincount(ids.reshape(-1), minlength=E).to(s.dtype) * (E / (K * T))
            total = total + self.alpha * (f * sn.mean(0)).sum()
        return total

    def loads(self):
        E = self.cfg.n_routed_experts
        return [torch.bincount(ids.reshape(-1), minlength=E) for _, ids in self.routes]

    def __call__(self, leaves, tokens, buffers=None):
        """tokens: 1-D LongTensor of T+1 ids. Returns (objective, lm, mtp, balance)."""
        self.routes = []
        ids, targets = tokens[:-1][None], tokens[1:]
        state = self.main_map.tensors(leaves)
        if buffers:
            state.update(buffers)
        out = torch.func.functional_call(self.main, state, (ids,),
                                         {"output_hidden_states": True, "use_cache": False})
        lm = F.cross_entropy(out.logits[0].to(self.dtype), targets)
        n_main_routes = len(self.routes)
        mtp = torch.zeros((), dtype=self.dtype)
        if self.mtp is not None and tokens.numel() >= 3:
            p, eps = self.mtp_prefix, self.cfg.rms_norm_eps
            h = out.hidden_states[-1][0, :-1]                 # after the final norm, rows 0 .. T-2
            e = F.embedding(tokens[1:-1], leaves[p + "embed_tokens.weight"])
            x = torch.cat([rmsnorm(e, leaves[p + "enorm.weight"], eps), rmsnorm(h, leaves[p + "hnorm.weight"], eps)], -1)
            x = F.linear(x, leaves[p + "eh_proj.weight"])
            st = self.mtp_map.tensors(leaves)
            if buffers:
                st.update({k: v for k, v in buffers.items() if k.startswith("mtp.")})
            mo = torch.func.functional_call(self.mtp, st, (), {"inputs_embeds": x[None], "use_cache": False})
            mtp = F.cross_entropy(mo.logits[0].to(self.dtype), tokens[2:])
        bal = self.balance() if self.alpha > 0 else torch.zeros((), dtype=self.dtype)
        obj = lm + bal + self.lam * mtp
        return obj, lm, mtp, bal, out, n_main_routes

    def mtp_logits(self, leaves, ids):
        """MTP logits of a (T,) input, for the fixture check."""
        p, eps = self.mtp_prefix, self.cfg.rms_norm_eps
        out = torch.func.functional_call(self.main, self.main_map.tensors(leaves), (ids[None],),
                                         {"output_hidden_states": True, "use_cache": False})
        h = out.hidden_states[-1][0, :-1]
        e = F.embedding(ids[1:], leaves[p + "embed_tokens.weight"])
        x = torch.cat([rmsnorm(e, leaves[p + "enorm.weight"], eps), rmsnorm(h, leaves[p + "hnorm.weight"], eps)], -1)
        x = F.linear(x, leaves[p + "eh_proj.weight"])
        mo = torch.func.functional_call(self.mtp, self.mtp_map.tensors(leaves), (), {"inputs_embeds": x[None], "use_cache": False})
        return mo.logits[0]


def check_fixture(obj, path, leaves):
    ref = load_file(os.path.join(path, "reference.safetensors"))
    ids = ref["input_ids"].long()
    with torch.no_grad():
        for b in range(ids.shape[0]):
            out = torch.func.functional_call(obj.main, obj.main_map.tensors(leaves), (ids[b:b + 1],), {"use_cache": False})
            r = rel(out.logits[0], ref["logits"][b])
            print(f"  fixture check {os.path.basename(path)} row {b}: logits rel err {r:.2e}")
            assert r < 1e-5, "the PyTorch model does not reproduce the fixture's logits"
            if obj.mtp is not None and "mtp_logits" in ref:
                r = rel(obj.mtp_logits(leaves, ids[b]), ref["mtp_logits"][b])
                print(f"  fixture check row {b}: MTP logits rel err {r:.2e}")
                assert r < 1e-5, "the PyTorch MTP module does not reproduce the fixture's mtp_logits"


def mode_grads(args):
    torch.manual_seed(1234)
    obj = Objective(args.model, torch.float64, args.alpha, args.lam)
    leaves = {k: v.clone().requires_grad_(True) for k, v in obj.pub.items() if not k.endswith("e_score_correction_bias")}
    check_fixture(obj, args.model, {k: v.detach() for k, v in leaves.items()})
    V = obj.cfg.vocab_size
    g = torch.Generator().manual_seed(2024)
    tokens = torch.randint(0, V, (args.batch, args.seq_len + 1), generator=g)
    parts = {"objective": [], "lm_loss": [], "mtp_loss": [], "balance_loss": []}
    total = 0
    for b in range(args.batch):
        o, lm, mtp, bal, _, _ = obj(leaves, tokens[b])
        for k, v in zip(parts, (o, lm, mtp, bal)):
            parts[k].append(float(v.detach()))
        total = total + o / args.batch
    total.backward()
    out = {"tokens": tokens.to(torch.int32), "loss": torch.tensor([float(total)], dtype=torch.float64),
           "mtp_lambda": torch.tensor([args.lam], dtype=torch.float64),
           "balance_alpha": torch.tensor([args.alpha], dtype=torch.float64)}
    for k, v in parts.items():
        out[k] = torch.tensor(v, dtype=torch.float64)
    # Each gradient as F16 times a power-of-two scale (grad.<name>, scale.<name>): half the bytes
    # of F32 (the data travels to the GPU machine with every run there, under a 64 MiB limit) at a
    # relative rounding of 2^-11 per element, far below the test's bound of 1e-3.
    zero = 0
    for k in sorted(leaves):
        v = leaves[k]
        zero += v.grad is None
        g = (v.grad if v.grad is not None else torch.zeros_like(v)).to(torch.float64)
        m = g.abs().max().item()
        scale = 2.0 ** math.ceil(math.log2(m / 32768.0)) if m > 0 else 1.0
        out["grad." + k] = (g / scale).to(torch.float16).contiguous()
        out["scale." + k] = torch.tensor([scale], dtype=torch.float32)
    save_file(out, args.out)
    print(f"grads: loss {float(total):.10f} (lm {parts['lm_loss']}, mtp {parts['mtp_loss']}, balance {parts['balance_loss']}); "
          f"{len(leaves)} tensors ({zero} untouched experts' zero) -> {args.out}")


def lr_at(step, peak, min_lr, warmup, total):
    if step < warmup:
        return peak * (step + 1) / warmup
    s = min(step, total)
    span = max(1, total - warmup)
    progress = min(max((s - warmup) / span, 0.0), 1.0)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def mode_train(args):
    obj = Objective(args.model, torch.float32, args.alpha, 0.0)
    leaves = {k: v.clone().requires_grad_(True) for k, v in obj.pub.items() if not k.endswith("e_score_correction_bias")}
    check_fixture(obj, args.model, {k: v.detach() for k, v in leaves.items()})
    bias_names = [k for k in obj.pub if k.endswith("e_score_correction_bias")]
    biases = {k: obj.pub[k].clone() for k in bias_names}
    # a learnable stream (a short pattern, so that the loss falls far in 50 steps). Random tokens
    # would not do: their routing margins are so thin that a perturbation of 1e-6 in the initial
    # weights (fathom against fathom) flips an expert choice within ~10 steps, Adam turns the newly
    # touched expert's first gradient into a full-size step, and the runs part by 1e-3 within 20
    # steps — any two implementations would. On this stream the same perturbation stays below 1e-5.
    V = obj.cfg.vocab_size
    n = args.steps * args.batch * args.seq_len + 1 + 100
    stream = [3 + (i * 7 + i // 5) % min(50, V - 3) for i in range(n)]
    stream = torch.tensor(stream)
    decay = [v for v in leaves.values() if v.dim() >= 2]
    no_decay = [v for v in leaves.values() if v.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.peak, betas=(0.9, 0.95), eps=1e-8)
    moe_layers = [l for l in range(obj.cfg.num_hidden_layers) if l >= obj.cfg.first_k_dense_replace]
    offset = 0
    objectives, lms = [], []
    for step in range(args.steps):
        lr = lr_at(step, args.peak, args.min_lr, args.warmup, args.steps)
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loads = None
        o_sum = lm_sum = 0.0
        buffers = {f"model.layers.{l}.mlp.gate.e_score_correction_bias": biases[f"model.layers.{l}.mlp.gate.e_score_correction_bias"]
                   for l in moe_layers}
        for b in range(args.batch):
            w = stream[[(offset + i) % len(stream) for i in range(args.seq_len + 1)]]
            offset = (offset + args.seq_len) % len(stream)
            o, lm, _, _, _, _ = obj(leaves, w, buffers)
            (o / args.batch).backward()
            o_sum += float(o.detach()) / args.batch
            lm_sum += float(lm.detach()) / args.batch
            l = obj.loads()
            loads = l if loads is None else [a + c for a, c in zip(loads, l)]
        for v in leaves.values():  # fathom's gradients are dense: an unused expert's is zero, not absent
            if v.grad is None:
                v.grad = torch.zeros_like(v)
        torch.nn.utils.clip_grad_norm_(list(leaves.values()), args.clip)
        opt.step()
        E = obj.cfg.n_routed_experts
        for l, load in zip(moe_layers, loads):
            bias = biases[f"model.layers.{l}.mlp.gate.e_score_correction_bias"]
            total = int(load.sum())
            scaled = load * E
            bias -= args.gamma * (scaled > total).to(bias.dtype)
            bias += args.gamma * (scaled < total).to(bias.dtype)
        objectives.append(o_sum)
        lms.append(lm_sum)
        print(f"  step {step + 1}: objective {o_sum:.6f} lm {lm_sum:.6f} lr {lr:.3e}")
    out = {"stream": stream.to(torch.int32), "objective": torch.tensor(objectives, dtype=torch.float64),
           "lm_loss": torch.tensor(lms, dtype=torch.float64)}
    for k in ("seq_len", "batch", "steps", "warmup"):
        out[k] = torch.tensor([getattr(args, k)], dtype=torch.int64)
    for k in ("peak", "min_lr", "wd", "clip", "gamma", "alpha"):
        out[k] = torch.tensor([getattr(args, k)], dtype=torch.float64)
    save_file(out, args.out)
    print(f"train: {args.steps} steps, objective {objectives[0]:.4f} -> {objectives[-1]:.4f} -> {args.out}")


def mode_check(args):
    """A fathom checkpoint in transformers: same logits as fathom computed for it."""
    model = load_hf(args.model, torch.float32).eval()
    want = load_file(args.fathom_logits)
    ids = load_file(args.input_ids)["input_ids"].long()
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    r = rel(got, want["logits"])
    print(f"check: {args.model} in transformers: logits rel err {r:.2e} against fathom's")
    missing = [k for k in published(args.model) if k.startswith(f"model.layers.{model.config.num_hidden_layers}.")]
    print(f"check: {len(missing)} MTP tensors in the checkpoint")
    result = {"logits_rel_err": r, "mtp_tensors": len(missing), "ok": r <= 1e-4}
    if args.result:
        with open(args.result, "w") as f:
            json.dump(result, f)
    if r > 1e-4:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["grads", "train", "check"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--seq-len", dest="seq_len", type=int, default=24)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak", type=float, default=2e-3)
    ap.add_argument("--min-lr", dest="min_lr", type=float, default=2e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--fathom-logits", dest="fathom_logits")
    ap.add_argument("--input-ids", dest="input_ids")
    ap.add_argument("--result")
    args = ap.parse_args()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    {"grads": mode_grads, "train": mode_train, "check": mode_check}[args.mode](args)


if __name__ == "__main__":
    main()
