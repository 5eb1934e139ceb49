"""Score a model on GSM8K: `[torchrun --nproc_per_node=N] eval_gsm8k.py --run_dir outputs/... [--limit 100]`, or
`--model NAME [--adapter DIR]`, or `--score predictions.jsonl` to re-score. All logic lives in peftlab.eval.gsm8k;
`--help` lists the flags."""
from peftlab.eval.gsm8k import cli

if __name__ == "__main__":
    cli()
