"""EleutherAI's lm-evaluation-harness on mai_jax workdirs (needs the `lmeval` extra).

lm_eval 0.4.13 discovers no models through entry points, so the `mai_jax` model is registered
when mai_jax.harness.model is imported: `python -m mai_jax.harness --model mai_jax
--model_args workdir=W --tasks T` is lm_eval's own command line with it registered, and
`mai-jax eval --tasks T1,T2` and train.eval_tasks call the same code (harness/tasks.py).
Nothing here is imported by the rest of the package unless a harness task is asked for:
lm_eval and its dataset stack take seconds to import.
"""
