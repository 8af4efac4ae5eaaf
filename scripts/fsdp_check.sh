#!/usr/bin/env bash
# FSDP2 smoke check on one GPU (run on an H100 on 2026-11-27; output in scripts/results/fsdp_1gpu_*):
# a 4-layer random Llama trained 4 L3M steps under examples/accelerate/fsdp.yaml, checkpoint-4 deleted,
# resumed from checkpoint-2, the final model loaded with AutoModelForCausalLM. Needs a tokenizer in .gputok/
# (copy ~/.cache/l3m/SmolLM2-135M-Instruct/tokenizer* and chat_template.jinja there).
set -x
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY'
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(".gputok")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained("/tmp/tiny"); tok.save_pretrained("/tmp/tiny")
PY
cat > /tmp/cfg.yaml <<'Y'
model: /tmp/tiny
data: {train: builtin}
constraints: [{kind: length, max: 20}]
training: {output_dir: /tmp/run, max_steps: 4, save_steps: 2, per_device_train_batch_size: 4, num_generations: 2, max_new_tokens: 16, learning_rate: 1.0e-3, disable_tqdm: true}
Y
L="accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 1 --main_process_port 29555 -m l3m.cli train /tmp/cfg.yaml"
$L 2>&1 | grep -v Warning | tail -25
ls /tmp/run /tmp/run/checkpoint-4
grep -c loss /tmp/run/metrics.jsonl
cp /tmp/run/metrics.jsonl $OUT/fsdp_metrics_first.jsonl
rm -rf /tmp/run/checkpoint-4
$L training.resume_from_checkpoint=true 2>&1 | grep -v Warning | tail -8
cp /tmp/run/metrics.jsonl $OUT/fsdp_metrics_resumed.jsonl
python3 -c "from transformers import AutoModelForCausalLM; m=AutoModelForCausalLM.from_pretrained('/tmp/run'); print('loaded', sum(p.numel() for p in m.parameters()))"
