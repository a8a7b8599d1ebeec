"""Demo experiment harness: train SFT/SDFT on (a subset of) the demo facts, evaluate direct/indirect/
retention/KL plus diagnostics (train-prompt recall, teacher-forced answer log-prob)."""
import os
HERE = os.path.dirname(os.path.abspath(__file__))
import argparse, json, os, sys, time, dataclasses
import torch
p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--method", default="sdft")
p.add_argument("--data", default=None)
p.add_argument("--facts", type=int, default=40)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--ng", type=int, default=1)
p.add_argument("--temp", type=float, default=1.0)
p.add_argument("--mnt", type=int, default=16)
p.add_argument("--skip", type=int, default=0)
p.add_argument("--ema", type=float, default=0.01)
p.add_argument("--teacher", default="ema")
p.add_argument("--alpha", type=float, default=0.0)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=0)
p.add_argument("--start", action="store_true", help="evaluate the untrained model only")
a = p.parse_args()
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from transformers import AutoTokenizer
from sdft_fast.default_model import default_model_path
from sdft_fast.demo import load_demo
from sdft_fast.data import encode_examples, DataLimits, Example, encode_prompt
from sdft_fast.eval import evaluate_accuracy, retention_probes, reference_logprobs, kl_from_reference, completion_logits
from sdft_fast.trainer import TrainConfig, build_model, train

t0 = time.time(); load0 = os.getloadavg()[0]
mp = default_model_path(); tok = AutoTokenizer.from_pretrained(str(mp))
demo = load_demo(a.data)
fact_ids = list(demo.documents)[: a.facts]
keep = set(fact_ids)
train_rows = [e for e in demo.train if e.meta["fact"] in keep]
direct = [e for e in demo.direct if e.meta["fact"] in keep]
indirect = [e for e in demo.indirect if e.meta["fact"] in keep]
ans = {}
for e in demo.direct + demo.indirect:
    ans.setdefault(e.meta["fact"], []).extend(e.answers)
# Train-prompt recall: greedy answer to a training prompt contains any of the fact's answer strings.
from sdft_fast.eval import normalize_text
def _unseen(e):  # answers not already written in the prompt (echoing the prompt is not recall)
    pn = " " + normalize_text(e.prompt) + " "
    return [x for x in ans[e.meta["fact"]] if " " + normalize_text(x) + " " not in pn and normalize_text(x).split()[-1] not in pn.split()]
train_probe = [dataclasses.replace(e, answers=_unseen(e)) for e in train_rows if _unseen(e)]
enc = encode_examples(train_rows, tok, limits=DataLimits(256, 1024, 128), teacher_template=demo.teacher_template)
extra = {}
if a.ng > 1: extra["num_generations"] = a.ng
cfg = TrainConfig(method=a.method, teacher=a.teacher, ema_rate=a.ema, skip_tokens=a.skip, max_new_tokens=a.mnt,
                  temperature=a.temp, alpha=a.alpha, lr=a.lr, max_steps=a.steps, warmup_steps=a.warmup,
                  batch_size=a.bs, lora_rank=a.rank, seed=a.seed, device="cpu", progress=False, tensorboard=False, **extra)
model = build_model(mp, cfg)
ref_path = os.path.join(HERE, "ref.pt")
if os.path.exists(ref_path):
    ref = torch.load(ref_path, weights_only=False)
else:
    ref = reference_logprobs(model, tok); torch.save(ref, ref_path)

@torch.no_grad()
def answer_logp(examples):
    prompts = [encode_prompt(tok, e.prompt, None) for e in examples]
    comps = [tok.encode(e.answers[0], add_special_tokens=False) for e in examples]
    lp = torch.log_softmax(completion_logits(model, prompts, comps).float(), -1)
    tgt = torch.tensor([t for c in comps for t in c])
    per = lp[torch.arange(len(tgt)), tgt]
    out, i = [], 0
    for c in comps:
        out.append(float(per[i:i+len(c)].sum())); i += len(c)
    return sum(out) / len(out), sum(x > -2.0 for x in out) / len(out)

def scores():
    kw = dict(max_new_tokens=32, batch_size=20)
    s = {}
    d = evaluate_accuracy(model, tok, direct, **kw); s["direct"] = d["accuracy"]
    i = evaluate_accuracy(model, tok, indirect, **kw); s["indirect"] = i["accuracy"]
    r = evaluate_accuracy(model, tok, retention_probes(), **kw); s["retention"] = r["accuracy"]
    t = evaluate_accuracy(model, tok, train_probe, max_new_tokens=24, batch_size=20); s["train_recall"] = t["accuracy"]
    s["kl"] = kl_from_reference(model, ref)
    s["direct_logp"], s["direct_logp_gt-2"] = answer_logp(direct)
    s["indirect_logp"], _ = answer_logp(indirect)
    s["samples"] = [(x["prediction"][:90], x["correct"]) for x in d["records"][:4]]
    return s

t_train = 0.0; steps_done = 0; curve = []; trainstats = {}
if not a.start:
    t1 = time.time()
    curve = []
    def efn(m, step):
        d = evaluate_accuracy(model, tok, direct, max_new_tokens=24, batch_size=20)["accuracy"]
        lp, gt = answer_logp(direct)
        r = dict(step=step, direct24=d, direct_logp=round(lp, 2), t=round(time.time() - t1))
        curve.append(r); print("CURVE", json.dumps(r), flush=True)
        return r
    if a.eval_every:
        cfg.eval_every = a.eval_every
    res = train(model, tok, enc, cfg, eval_fn=efn if a.eval_every else None)
    t_train = time.time() - t1; steps_done = res.steps
    tr = [r for r in res.metrics if not r.get("eval")]
    def avg(k, rows): 
        v = [r[k] for r in rows if k in r]; return round(sum(v) / len(v), 4) if v else None
    trainstats = {k: (avg(k, tr[:5]), avg(k, tr[-5:])) for k in ("loss", "grad_norm", "divergence", "step_s", "completion_len_mean")}
t2 = time.time(); s = scores(); t_eval = time.time() - t2
row = dict(name=a.name, args=vars(a), n_train=len(train_rows), n_train_probe=len(train_probe), n_facts=len(fact_ids), steps=steps_done,
           train_s=round(t_train), eval_s=round(t_eval), load_start=load0, load_end=os.getloadavg()[0], threads=1, curve=curve, trainstats=trainstats, **s)
print(json.dumps(row, indent=None))
with open(os.path.join(HERE, "results.jsonl"), "a") as f: f.write(json.dumps(row) + "\n")
