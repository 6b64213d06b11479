"""``onecard demo``: LoRA on SmolLM2-135M-Instruct teaches Kestrel Bikes' house style, measured before and after.

- :mod:`onecard.demo.style`: the task metric (0-100), the house style's rules;
- :mod:`onecard.demo.dataset`: the bundled dataset's generator (files in ``onecard/assets/demo``);
- :mod:`onecard.demo.evaluate`: one evaluation pass (held-out loss + style of greedy answers);
- :mod:`onecard.demo.run`: the demo itself, through ``onecard.train.loop.train``.
"""
