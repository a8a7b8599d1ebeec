"""Where is the SDFT signal? Sample rollouts from the start model, score per position with teacher/student."""
import sys, json, torch
torch.set_num_threads(1); sys.path.insert(0, "/work/main")
from transformers import AutoTokenizer
from sdft_fast.default_model import default_model_path
from sdft_fast.demo import load_demo
from sdft_fast.data import encode_examples, DataLimits
from sdft_fast.trainer import TrainConfig, build_model
from sdft_fast.model import PairBatch
mp = default_model_path(); tok = AutoTokenizer.from_pretrained(str(mp))
demo = load_demo(sys.argv[1] if len(sys.argv) > 1 else None)
rows = [e for e in demo.train if e.meta["fact"] in ("velmora-mayor", "zephrin-prize", "korrin-marathon", "halvex-ceo")]
enc = encode_examples(rows, tok, limits=DataLimits(256, 1024, 128), teacher_template=demo.teacher_template)
model = build_model(mp, TrainConfig(device="cpu"))
ans = {e.meta["fact"]: e.answers[0] for e in demo.direct}
eos = [tok.eos_token_id]
tot_pos = 0; sig_pos = 0; name_hits = 0; n = 0
for ex, row in list(zip(enc, rows))[:8]:
    comps = model.generate([ex.student_prompt_ids] * 4, max_new_tokens=16, do_sample=True, temperature=float(sys.argv[2]), eos_token_id=eos, pad_token_id=tok.pad_token_id, seed=1)
    out = model.forward_pair(PairBatch([ex.student_prompt_ids] * 4, [ex.teacher_prompt_ids] * 4, comps))
    W = model.lm_head_weight
    with torch.no_grad():
        ls = torch.log_softmax(out.student_hidden.float() @ W.float().T, -1)
        lt = torch.log_softmax(out.teacher_hidden.float() @ W.float().T, -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
    first = tok.encode(" " + ans[row.meta["fact"]], add_special_tokens=False)[0]
    first0 = tok.encode(ans[row.meta["fact"]], add_special_tokens=False)[0]
    i = 0
    print("PROMPT:", row.prompt, "| answer", ans[row.meta["fact"]])
    for c in comps:
        seg = slice(i, i + len(c)); i += len(c)
        text = tok.decode(c)
        k = kl[seg]; pt = torch.maximum(lt[seg, first], lt[seg, first0]).exp(); ps = torch.maximum(ls[seg, first], ls[seg, first0]).exp()
        j = int(k.argmax())
        toks = [tok.decode([t]) for t in c]
        print(f"  {text!r}\n    KL/pos mean {k.mean():.2f}, max {k.max():.2f} at {j} ({toks[j]!r}, teacher top {tok.decode([int(lt[i-len(c)+j].argmax())])!r}); "
              f"max teacher P(name tok) {pt.max():.2f} at {int(pt.argmax())}, student {ps[int(pt.argmax())]:.3f}; positions KL>1: {int((k>1).sum())}")
        tot_pos += len(c); sig_pos += int((pt > 0.3).sum()); n += 1
        name_hits += ans[row.meta["fact"]].split()[0].lower() in text.lower()
print(f"rollouts {n}, tokens {tot_pos}, positions with teacher P(first name token)>0.3: {sig_pos}, rollouts containing the name: {name_hits}")
