"""The Keras example of seed 004 (LSTM 128 on Nietzsche), timed on this machine for a same-run
comparison with `benchmarks/keras_recipe.py`.  Runs in a TensorFlow environment, not charrnn's:

    benchmarks/peers/run_keras_lstm.sh [--epochs 3] [--corpus PATH]

The data preparation, model, optimiser and batch are the example's, line for line in effect
(one-hot arrays built in memory, model.fit one epoch at a time); the per-epoch text generation is
left out because it is not part of an epoch's training time.  Prints one JSON line:
{"epoch_loss": [...], "epoch_seconds": [...], "peak_rss_mb", "tensorflow", "keras", ...}.
"""
import argparse
import json
import os
import platform
import resource
import time

import numpy as np
import tensorflow as tf


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--corpus", default=os.path.join(os.environ.get("CHARRNN_DATA", "../shared/data"), "nietzsche.txt"))
    args = p.parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        text = f.read().lower()
    text = text.replace("\n", " ")
    chars = sorted(set(text))
    char_indices = {c: i for i, c in enumerate(chars)}
    maxlen, step = 40, 3
    sentences, next_chars = [], []
    for i in range(0, len(text) - maxlen, step):
        sentences.append(text[i:i + maxlen])
        next_chars.append(text[i + maxlen])
    x = np.zeros((len(sentences), maxlen, len(chars)), dtype="bool")
    y = np.zeros((len(sentences), len(chars)), dtype="bool")
    for i, sentence in enumerate(sentences):
        for t, char in enumerate(sentence):
            x[i, t, char_indices[char]] = 1
        y[i, char_indices[next_chars[i]]] = 1
    model = tf.keras.Sequential([tf.keras.Input(shape=(maxlen, len(chars))), tf.keras.layers.LSTM(128),
                                 tf.keras.layers.Dense(len(chars), activation="softmax")])
    model.compile(loss=tf.keras.losses.CategoricalCrossentropy(),
                  optimizer=tf.keras.optimizers.RMSprop(learning_rate=0.01))
    losses, seconds = [], []
    for _ in range(args.epochs):
        t = time.perf_counter()
        h = model.fit(x, y, batch_size=1024, epochs=1, verbose=0)
        seconds.append(round(time.perf_counter() - t, 1))
        losses.append(round(float(h.history["loss"][-1]), 4))
    print(json.dumps({"benchmark": "keras_lstm_peer", "windows": len(sentences), "steps_per_epoch": -(-len(sentences) // 1024),
                      "epoch_loss": losses, "epoch_seconds": seconds,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "tensorflow": tf.__version__, "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else None,
                      "threads": os.cpu_count(), "python": platform.python_version()}))


if __name__ == "__main__":
    main()
