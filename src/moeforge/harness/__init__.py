"""lm-evaluation-harness integration: the ``moeforge`` LM (:mod:`moeforge.harness.lm`) and the runner
behind ``moeforge eval`` (:mod:`moeforge.harness.run`). Needs the ``[eval]`` extra."""
