#!/bin/sh
# ROUGE vs compress_ratio on the summarization smoke sample with the default model (SmolLM2-135M-Instruct):
# the acceptance settings (cnn_dailymail budgets, test[:3], 64 new tokens) for 7 methods x 4 ratios.
# Run from the repository root: sh benchmarks/summarization_smoke/sweep.sh   (OUT=dir to change where)
OUT=${OUT:-results_summarization/sweep}
for m in SnapKV H2O StreamingLLM SimCalKV KeepKV PyramidInfer CaM; do
  for ratio in 0.2 0.4 0.6 0.8; do
    python run_summarization.py --dataset cnn_dailymail --split "test[:3]" --compress_ratio $ratio \
      --kv_method $m --num_threads 1 --output_dir "$OUT/${m}_$ratio" || exit 1
  done
done
python scripts/plot_summarization.py "$OUT"/*_0.* --plot "$OUT/rouge_vs_ratio.png" --table "$OUT/table.md"
