#!/usr/bin/env bash
# The README's real run, reproducible: train the paper's networks with the CLI, analyze them with
# the CLI, and copy the pictures the README shows into docs/img. Weights stay in out/ (ignored).
# Usage: docs/real-run.sh            (about 5 minutes on 2 CPU cores; topdown on Fashion-MNIST
#        and ResNet18 on Fashion-MNIST add ~40 minutes with FULL=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ds=.venv/bin/deepscope
models=out/models
runs=out/runs
mkdir -p "$models" "$runs" docs/img

train() {  # arch dataset recipe epochs
  local f="$models/$1-$2.safetensors"
  [ -f "$f" ] || $ds train "$1" --dataset "$2" --recipe "$3" --epochs "$4" --out "$f"
}
train fcnn1 digits paper 30
train fcnn5 digits paper 30
train fcnn1 fashion-mnist paper 5
train fcnn5 fashion-mnist paper 5
train resnet18_gray digits fast 10
train topdown digits fast 15
if [ "${FULL:-0}" = 1 ]; then train topdown fashion-mnist fast 5; train resnet18_gray fashion-mnist fast 2; fi

analyze() {  # model analysis [params]
  local out="$runs/$1/$2"
  [ -f "$out/result.json" ] || $ds analyze "$models/$1.safetensors" --analysis "$2" \
    --params "${3:-{\}}" --out "$out" -q
}
for m in fcnn1-digits fcnn5-digits fcnn1-fashion-mnist fcnn5-fashion-mnist resnet18_gray-digits topdown-digits; do
  analyze "$m" signal_space
  analyze "$m" residuals '{"max_iter": 100}'
done

# Issue 3: inverse maps and input optimization on the trained networks.
for m in fcnn1-digits fcnn5-digits resnet18_gray-digits topdown-digits fcnn5-fashion-mnist; do
  analyze "$m" inverse_images
  analyze "$m" activation_maximization
done
analyze resnet18_gray-digits caricature '{"layers": ["layer1.1.conv2", "layer3.0.conv1"], "images": [0, 1, 2, 3]}'
analyze resnet18_gray-digits inversion '{"layers": ["conv1", "layer2.1.conv2", "layer4.1.conv2"], "images": [0, 1, 2, 3]}'
analyze topdown-digits inversion '{"layers": ["stage1.conv1", "stage2.conv2", "stage3.conv2"], "images": [0, 1, 2, 3]}'

cp "$runs/fcnn1-digits/inverse_images/inverse_images.png" docs/img/fcnn1-digits-inverse.png
cp "$runs/fcnn5-digits/inverse_images/inverse_images.png" docs/img/fcnn5-digits-inverse.png
cp "$runs/resnet18_gray-digits/inverse_images/inverse_images.png" docs/img/resnet18-digits-inverse.png
cp "$runs/fcnn5-digits/activation_maximization/activation_maximization.png" docs/img/fcnn5-digits-actmax.png
cp "$runs/resnet18_gray-digits/activation_maximization/activation_maximization.png" docs/img/resnet18-digits-actmax.png
cp "$runs/fcnn5-fashion-mnist/activation_maximization/activation_maximization.png" docs/img/fcnn5-fashion-actmax.png
cp "$runs/resnet18_gray-digits/caricature/caricature.png" docs/img/resnet18-digits-caricature.png
cp "$runs/resnet18_gray-digits/inversion/inversion.png" docs/img/resnet18-digits-inversion.png
cp "$runs/topdown-digits/inversion/inversion.png" docs/img/topdown-digits-inversion.png

cp "$runs/fcnn1-digits/signal_space/weights_fc1.png" docs/img/fcnn1-digits-weights.png
cp "$runs/fcnn1-digits/signal_space/singular_vectors_fc1.png" docs/img/fcnn1-digits-singular-vectors.png
cp "$runs/fcnn5-fashion-mnist/signal_space/spectra.png" docs/img/fcnn5-fashion-spectra.png
cp "$runs/resnet18_gray-digits/signal_space/spectra.png" docs/img/resnet18-digits-spectra.png
cp "$runs/resnet18_gray-digits/signal_space/singular_vectors_layer1.0.conv1.png" docs/img/resnet18-layer1.0.conv1-vectors.png
cp "$runs/fcnn1-fashion-mnist/residuals/residuals_fc1.png" docs/img/fcnn1-fashion-residuals.png
cp "$runs/resnet18_gray-digits/residuals/lost_fraction_by_depth.png" docs/img/resnet18-lost-by-depth.png

# One table of accuracy and condition numbers, from the result files.
.venv/bin/python - "$models" "$runs" <<'PY'
import json, sys
from pathlib import Path
models, runs = Path(sys.argv[1]), Path(sys.argv[2])
print("| model | dataset | held-out accuracy | condition numbers (kernels view) |")
print("|---|---|---|---|")
for run in sorted(runs.iterdir()):
    if not (run / "signal_space" / "result.json").exists():
        continue
    manifest = json.loads((models / f"{run.name}.json").read_text())
    layers = json.loads((run / "signal_space" / "result.json").read_text())["metrics"]["layers"]
    shown = layers if len(layers) <= 5 else [l for l in layers if l["name"] in ("conv1", "layer1.0.conv1", "layer4.1.conv2", "fc", "stage1.conv1", "stage3.conv2", "head")]
    conds = ", ".join(f"{l['name']} {l['condition_number']:.3g}" for l in shown)
    for kind in ("inverse_images",):
        path = run / kind / "result.json"
        if path.exists():
            targets = json.loads(path.read_text())["metrics"]["targets"]
            for method in ("pinv", "pinv_box"):
                rows = [t for t in targets if t["method"] == method]
                if rows:
                    status = {t["reachable"] for t in rows}
                    hits = sum(t["predicted_class"] == t["class"] for t in rows)
                    worst = max(t["output_error"] for t in rows)
                    print(f"<!-- {run.name} {method}: {sorted(status)}, {hits}/{len(rows)} classified as their class, max output error {worst:.2g}, pixels [{min(t['pixel_min'] for t in rows):.3g}, {max(t['pixel_max'] for t in rows):.3g}] -->")
    t = manifest["training"]
    print(f"| {manifest['arch']} | {t['dataset']} | {t['accuracy']:.1%} | {conds} |")
PY
