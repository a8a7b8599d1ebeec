"""Per teacher template: style/noise KL (mean per token) vs fact signal on the student's own rollouts (start model)."""
import os
HERE = os.path.dirname(os.path.abspath(__file__))
import sys, torch
torch.set_num_threads(1); sys.path.insert(0, "/work/main")
from transformers import AutoTokenizer
from sdft_fast.default_model import default_model_path
from sdft_fast.demo import load_demo
from sdft_fast.data import encode_examples, DataLimits
from sdft_fast.trainer import TrainConfig, build_model
from sdft_fast.model import PairBatch
mp = default_model_path(); tok = AutoTokenizer.from_pretrained(str(mp))
demo = load_demo(os.path.join(HERE, "facts_aug.jsonl"))
facts = list(demo.documents)[:10]
rows = [e for e in demo.train if e.meta["fact"] in facts][::4]  # ~18 prompts
ans = {e.meta["fact"]: e.answers[0] for e in demo.direct}
model = build_model(mp, TrainConfig(device="cpu"))
T = {
 "demo": demo.teacher_template,
 "plain": "{demonstration}\n\n{prompt}",
 "fact_q": "Fact: {demonstration}\n\nQuestion: {prompt}",
 "q_then_fact": "{prompt}\n\n(Background you may use: {demonstration})",
 "use_if": "Use this information to answer: {demonstration}\n\n{prompt}",
}
temp = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
enc0 = encode_examples(rows, tok, limits=DataLimits(256, 1024, 128), teacher_template=T["demo"])
comps_all = [model.generate([e.student_prompt_ids] * 2, max_new_tokens=16, do_sample=True, temperature=temp,
             eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id, seed=3) for e in enc0]
W = model.lm_head_weight.float()
for name, tpl in T.items():
    enc = encode_examples(rows, tok, limits=DataLimits(256, 1024, 128), teacher_template=tpl)
    kls, sig, firstpos = [], [], []
    for e, row, comps in zip(enc, rows, comps_all):
        out = model.forward_pair(PairBatch([e.student_prompt_ids] * 2, [e.teacher_prompt_ids] * 2, comps))
        with torch.no_grad():
            ls = torch.log_softmax(out.student_hidden.float() @ W.T, -1); lt = torch.log_softmax(out.teacher_hidden.float() @ W.T, -1)
            kl = (lt.exp() * (lt - ls)).sum(-1)
        ids = {tok.encode(" " + ans[row.meta["fact"]], add_special_tokens=False)[0], tok.encode(ans[row.meta["fact"]], add_special_tokens=False)[0]}
        ids = torch.tensor(sorted(ids))
        pt = lt[:, ids].exp().sum(-1); ps = ls[:, ids].exp().sum(-1)
        kls.append(kl); sig.append((pt - ps).clamp(min=0))
        i = 0
        for c in comps:
            firstpos.append(float(kl[i])); i += len(c)
    kl = torch.cat(kls); s = torch.cat(sig)
    print(f"{name:12s} KL/token {kl.mean():.3f}  KL pos0 {sum(firstpos)/len(firstpos):.3f}  fact signal sum(P_T-P_S of answer's 1st token) per rollout {s.sum()/ (2*len(rows)):.3f}  ratio {s.sum()/kl.sum():.4f}")
