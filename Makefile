# Quick start and everyday targets. DATA defaults to ../shared/data when it exists (offline machines),
# else ./data (torchvision downloads MNIST and CIFAR-10 there).
DATA ?= $(if $(wildcard ../shared/data),../shared/data,data)
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
MNIST_CKPT ?= checkpoints/mnist_cnn.pt
CIFAR_CKPT ?= checkpoints/cifar_cnn.pt
RESNET_CKPT ?= $(if $(wildcard ../shared/checkpoints/resnet18_cifar10.pt),../shared/checkpoints/resnet18_cifar10.pt,checkpoints/resnet18_cifar10.pt)
# `make results RESULTS_OUT=...` writes the doc elsewhere (tests/test_docs.py compares it with docs/RESULTS.md)
RESULTS_OUT ?= docs/RESULTS.md
CLI = $(PYTHON) -m cnn_sparsegpt

.PHONY: quickstart install install-test test test-all checkpoints bench ablation accuracy plot results speed

quickstart: install $(MNIST_CKPT)
	$(CLI) bench --config configs/bench_quickstart.yaml --data-dir $(DATA)
	$(PYTHON) -m cnn_sparsegpt.commands.results --csv experiments/quickstart.csv --models mnist_cnn

install:
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q -e ".[test]"

$(MNIST_CKPT):
	$(CLI) train --model mnist_cnn --data-dir $(DATA) --epochs 3 --out $(MNIST_CKPT)

$(CIFAR_CKPT):
	$(CLI) train --model cifar_cnn --data-dir $(DATA) --epochs 6 --lr 0.1 --out $(CIFAR_CKPT)

checkpoints: $(MNIST_CKPT) $(CIFAR_CKPT)

test: install-test
	$(PYTHON) -m pytest -q -m "not slow and not gpu"

test-all: install-test
	$(PYTHON) -m pytest -q

bench: install checkpoints
	$(CLI) bench --config configs/bench_default.yaml --data-dir $(DATA)

ablation: install
	$(CLI) bench --config configs/bench_ablation.yaml --data-dir $(DATA)
	$(CLI) bench --config configs/bench_bn.yaml --data-dir $(DATA)
	for c in configs/bench_holdout_*.yaml; do $(CLI) bench --config $$c --data-dir $(DATA) || exit 1; done

plot:
	$(CLI) plot --csv experiments/results.csv --out experiments/plots

results:
	$(PYTHON) -m cnn_sparsegpt.commands.results --csv experiments/results.csv --out $(RESULTS_OUT) --preamble docs/results_preamble.md \
		--holdout-csv experiments/holdout.csv --postscript docs/results_holdout.md \
		--recipes-csv experiments/accuracy_holdout.csv experiments/accuracy_test.csv experiments/gpu/h100/accuracy_holdout_gpu.csv experiments/gpu/h100/accuracy_test_gpu.csv experiments/solver_hessians_holdout.csv experiments/exact_test.csv --recipes-text docs/results_recipes.md \
		--seeds-csv experiments/seeds_test.csv $(if $(wildcard experiments/finetune/*.json),--finetune-json $(wildcard experiments/finetune/*.json)) \
		$(if $(wildcard experiments/finetune_sweep/*.json),--sweep-json $(wildcard experiments/finetune_sweep/*.json))

accuracy: install
	$(CLI) bench --config configs/bench_accuracy_holdout.yaml --data-dir $(DATA)
	$(CLI) bench --config configs/bench_accuracy_test.yaml --data-dir $(DATA)
	$(CLI) plot --csv experiments/accuracy_test.csv --out experiments/plots/accuracy

speed: install
	$(PYTHON) benchmarks/speed.py --data-dir $(DATA) --weights $(RESNET_CKPT)
