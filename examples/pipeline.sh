#!/usr/bin/env bash
# A model pipeline's deepscope steps (docs/ci.md): train → upload (labelled with the commit) →
# analyze → check against the last release's job → log to MLflow.
#
# Needs only the light client (`pip install 'deepscope[mlflow]'`: no torch) and a running
# service. tests/integration/test_pipeline_script.py runs this script against the real stack.
#
# Settings (environment):
#   DEEPSCOPE_URL, DEEPSCOPE_API_KEY   the service and its key (required by the service)
#   MODEL          the trained weights (.safetensors, its manifest MODEL.json beside it);
#                  trained here with $DEEPSCOPE_TRAIN when the file does not exist
#   DEEPSCOPE_TRAIN  the command whose `train` subcommand trains (default: deepscope; it needs
#                  the server extra, or replace this step with your own training)
#   ARCH, DATASET, EPOCHS   what is trained (default: fcnn1, digits, 3)
#   ANALYSIS       the analysis to run and compare (default: signal_space)
#   MAX_INCREASE   gates against the baseline, space-separated METRIC=PCT
#                  (default: condition_number=50%)
#   PROJECT        the model's project, a label (default: the git checkout's directory name):
#                  one tenant can hold many projects, each with its own releases
#   RELEASE        true: this run is a release; its job is the baseline of later runs
#   BASELINE_JOB   the job to compare with (default: the newest succeeded job of ANALYSIS
#                  labelled project=PROJECT and release=true; none yet: the check is skipped)
#   GIT_SHA, GIT_BRANCH   labels (default: from git, else "unknown")
#   MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID
#                  where the job is logged; unset MLFLOW_TRACKING_URI: not logged
#
# stdout: the job id, last. Exit: 0 ok; 1 the job failed or a gate failed (logged to MLflow all
# the same); 2 an error (unreachable service, bad settings).
set -euo pipefail

MODEL=${MODEL:-model.safetensors}
DEEPSCOPE_TRAIN=${DEEPSCOPE_TRAIN:-deepscope}
ARCH=${ARCH:-fcnn1}
DATASET=${DATASET:-digits}
EPOCHS=${EPOCHS:-3}
ANALYSIS=${ANALYSIS:-signal_space}
MAX_INCREASE=${MAX_INCREASE:-condition_number=50%}
RELEASE=${RELEASE:-false}
GIT_SHA=${GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PROJECT=${PROJECT:-$(basename "$(git rev-parse --show-toplevel 2>/dev/null || pwd)")}
GIT_BRANCH=${GIT_BRANCH:-$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)}

note() { echo "pipeline: $*" >&2; }

case "$RELEASE" in true | false) ;; *) note "RELEASE must be true or false, got '$RELEASE'"; exit 2 ;; esac

# 1. train (a stand-in for the project's own training step)
if [ ! -f "$MODEL" ]; then
  note "training $ARCH on $DATASET into $MODEL"
  # shellcheck disable=SC2086  # DEEPSCOPE_TRAIN may be a command with arguments
  $DEEPSCOPE_TRAIN train "$ARCH" --dataset "$DATASET" --epochs "$EPOCHS" --recipe fast \
    --out "$MODEL" >&2
fi

# 2. the baseline: found before this run's job exists, so a release never compares with itself
baseline=${BASELINE_JOB:-}
if [ -z "$baseline" ]; then
  baseline=$(deepscope jobs --analysis "$ANALYSIS" --status succeeded \
    --label "project=$PROJECT" --label release=true --limit 1 | awk 'NR == 1 { print $1 }')
fi

# 3. upload and analyze. The Idempotency-Key stands for this run's request (project, commit,
#    branch, release, analysis and the weights' sha256): a rerun of the pipeline gets the same job back
#    instead of a second one (and the same file is the same model: uploads are deduplicated).
sha256() {
  if command -v sha256sum >/dev/null; then sha256sum "$@"; else shasum -a 256 "$@"; fi
}
weights=$(sha256 "$MODEL" | cut -d' ' -f1)
request=$(printf '%s\n' "$PROJECT" "$GIT_SHA" "$GIT_BRANCH" "$RELEASE" "$ANALYSIS" "$weights" | sha256 | cut -d' ' -f1)
job=$(deepscope submit "$MODEL" --analysis "$ANALYSIS" \
  --label "project=$PROJECT" --label "git_sha=$GIT_SHA" --label "branch=$GIT_BRANCH" \
  --label "release=$RELEASE" \
  --idempotency-key "pipeline-$request" --wait -q | tail -n 1)
note "job $job ($ANALYSIS) succeeded"

# 4. the gate: no layer's metric more than PCT above the baseline's (exit 1 names the layers)
gate=0
if [ -n "$baseline" ]; then
  note "comparing with the release job $baseline"
  deepscope diff "$job" "$baseline" >&2
  args=()
  for spec in $MAX_INCREASE; do args+=(--max-increase "$spec"); done
  deepscope check "$job" --baseline "$baseline" "${args[@]}" >&2 || gate=$?
else
  note "no release job of $ANALYSIS yet: nothing to compare with"
fi
if [ "$gate" -gt 1 ]; then
  exit "$gate"
fi

# 5. the experiment tracker: every layer's metrics, the params, the artifacts and the report
if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then
  deepscope wait "$job" --mlflow -q >&2
  note "logged to MLflow ($MLFLOW_TRACKING_URI)"
fi

echo "$job"
exit "$gate"
