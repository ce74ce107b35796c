"""Training: the loop (:mod:`.loop`, improved-diffusion's TrainLoop), the data sets and the
resumable batch stream (:mod:`.data`), checkpoint files (:mod:`.checkpoint`: safetensors
weights with their config, training state, latest.json) and the training log (:mod:`.log`:
progress.jsonl and loss.png)."""
