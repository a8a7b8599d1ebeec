"""Cross-check: TRL's SDFTTrainer on 8 demo facts (1 train prompt each), forward KL, 60 steps; then our eval."""
import os
HERE = os.path.dirname(os.path.abspath(__file__))
import json, sys, time, tempfile, torch
torch.set_num_threads(1)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.sdft import SDFTConfig, SDFTTrainer
from sdft_fast.default_model import default_model_path
from sdft_fast.demo import load_demo
mp = str(default_model_path())
demo = load_demo()
facts = []
seen = set()
for ex in demo.train:
    f = ex.meta["fact"]
    if f in seen: continue
    seen.add(f); facts.append(ex)
    if len(facts) == 8: break
tok = AutoTokenizer.from_pretrained(mp)
model = AutoModelForCausalLM.from_pretrained(mp, dtype=torch.float32)
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": e.prompt}], "privileged_context": e.demonstration} for e in facts])
cfg = SDFTConfig(output_dir=os.path.join(HERE, "trl_out"), per_device_train_batch_size=8, num_generations=8, max_completion_length=32,
    distillation_mode="full_logits", distillation_alpha=0.0, learning_rate=float(sys.argv[1]) if len(sys.argv) > 1 else 5e-4,
    max_steps=60, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0,
    disable_tqdm=True, dataloader_num_workers=0)
tr = SDFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
    peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
t0 = time.time(); tr.train(); print("train s", time.time() - t0, flush=True)
print([r for r in tr.state.log_history if "loss" in r][-3:], flush=True)
merged = tr.model.merge_and_unload().eval()
# evaluate: greedy answers to the training prompts and to the direct questions of these 8 facts
from sdft_fast.eval import evaluate_accuracy
ids = {e.meta["fact"] for e in facts}
direct = [e for e in demo.direct if e.meta["fact"] in ids]
import dataclasses
train_q = [dataclasses.replace(e, answers=d.answers) for e in facts for d in direct if d.meta["fact"] == e.meta["fact"]]
for name, rows in (("direct", direct), ("train_prompts", train_q)):
    r = evaluate_accuracy(merged, tok, rows, max_new_tokens=32)
    print(name, {k: v for k, v in r.items() if k != "rows"} if isinstance(r, dict) else r, flush=True)
