"""Self-generation and self-rephrasing (ALARM), grounded by a metadata verifier.

Stages (each `run(cfg, run_dir) -> stage URI`): `ralm.selfgen.prompts.run`, `ralm.selfgen.generate.run`,
`ralm.selfgen.rephrase.run`. Components: `leak` (lexical leak detector), `verify` (metadata verifier),
`fallback` (grounded answers), `prompting` (message formats), `backend` (Serve or in-process engine),
`stage` (exactly-once batch loop), `audit` (reports).
"""
