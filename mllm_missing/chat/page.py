"""The web chat's single HTML page (served by `mllm_missing.chat.web`; ``__LIMIT_MB__`` is
replaced by the file size limit)."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mllm-missing chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
         padding: 0 1rem; color: #1b1b1b; background: #fafafa; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .hint { color: #555; margin-top: 0; }
  form { display: grid; gap: .7rem; background: #fff; padding: 1rem;
         border: 1px solid #ddd; border-radius: 8px; }
  label { font-weight: 600; }
  input[type=text] { font-size: 1rem; padding: .45rem; width: 100%; box-sizing: border-box; }
  button { font-size: 1rem; padding: .5rem 1.2rem; justify-self: start; }
  #turns { margin-top: 1.2rem; display: grid; gap: .8rem; }
  .turn, .live { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: .8rem 1rem; }
  .question { color: #444; }
  .answer { font-size: 1.5rem; font-weight: 700; margin: .3rem 0; }
  .status { font-family: ui-monospace, monospace; font-size: .95rem; }
  .missing { color: #a05a00; }
  .error { color: #b00020; font-weight: 600; }
  img.thumb { max-height: 64px; vertical-align: middle; margin-right: .5rem;
              image-rendering: pixelated; }
</style>
</head>
<body>
<h1>mllm-missing chat</h1>
<p class="hint">Give any of an image, audio and a question; what is missing is said with the
answer. Files up to __LIMIT_MB__ MB.</p>
<form id="ask">
  <div><label for="image">Image</label> <input type="file" id="image" name="image"
       accept="image/*"></div>
  <div><label for="audio">Audio</label> <input type="file" id="audio" name="audio"
       accept="audio/*"></div>
  <div><label for="text">Question</label>
       <input type="text" id="text" name="text" placeholder="What shape is in the image?"></div>
  <button type="submit" id="send">Ask</button>
</form>
<div id="turns" aria-live="polite"></div>
<script>
const LIMIT = __LIMIT_MB__ * 1024 * 1024;
const form = document.getElementById("ask");
const turns = document.getElementById("turns");

function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  return div;
}

function questionLine(question, file) {
  const q = line("question", "Q: " + (question || "(no text)"));
  if (file) {
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = URL.createObjectURL(file);
    q.prepend(img);
  }
  return q;
}

// A finished turn: the answer, then what was used, missing and chosen. `box` is the live box
// the answer streamed into (null: a new one).
function show(question, file, result, box) {
  if (!box) {
    box = document.createElement("div");
    turns.prepend(box);
  }
  box.className = "turn";
  box.replaceChildren(questionLine(question, file));
  if (result.error) {
    box.append(line("error", "error: " + result.error));
  } else {
    box.append(line("answer", result.answer));
    box.append(line("status", "used: " + (result.used.join(", ") || "\\u2014")));
    box.append(line(result.missing.length ? "status missing" : "status",
        "missing: " + (result.missing.join(", ") || "\\u2014")));
    if (result.ignored.length) box.append(line("status", "ignored: " + result.ignored.join(", ")));
    if (result.modules) box.append(line("status scheduler",
        "modules: " + result.modules + " (scheduler: " + result.scheduler + ")"));
    else if (result.prompt) box.append(line("status scheduler",
        "prompt: " + result.prompt + " (scheduler: " + result.scheduler + ")"));
    if (result.rationale) box.append(line("status", "why: " + result.rationale));
    if (result.transcript !== null) box.append(line("status", "heard: \\"" + result.transcript + "\\""));
    for (const note of result.notes) box.append(line("status", "note: " + note));
  }
  box.dataset.done = "1";
}

// POST /ask?stream=1 answers in lines of JSON: {"piece"} as the answer is generated, then
// {"turn"}. The live box is not a .turn until the turn is finished.
async function ask(data, question, file) {
  const box = document.createElement("div");
  box.className = "live";
  const answer = line("answer", "");
  box.append(questionLine(question, file), answer);
  turns.prepend(box);
  const response = await fetch("/ask?stream=1", {method: "POST", body: data});
  if (!(response.headers.get("Content-Type") || "").includes("ndjson")) {
    show(question, file, await response.json(), box);  // refused before answering (413)
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffered.indexOf("\\n")) >= 0) {
      const message = JSON.parse(buffered.slice(0, end));
      buffered = buffered.slice(end + 1);
      if (message.piece !== undefined) answer.textContent += message.piece;
      if (message.turn !== undefined) { show(question, file, message.turn, box); return; }
    }
  }
  show(question, file, {error: "the answer stopped before it was finished"}, box);
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const image = document.getElementById("image").files[0];
  const question = document.getElementById("text").value;
  for (const name of ["image", "audio"]) {
    const file = document.getElementById(name).files[0];
    if (file && file.size > LIMIT) {
      show(question, null, {error: name + " " + file.name + " is too large (" +
           (file.size / 1048576).toFixed(1) + " MB; the limit is __LIMIT_MB__ MB)"}, null);
      return;
    }
  }
  const button = document.getElementById("send");
  button.disabled = true;
  try {
    await ask(data, question, image);
  } catch (err) {
    const live = turns.querySelector(".live");
    show(question, image, {error: "no answer from the server (" + err + ")"}, live);
  } finally {
    button.disabled = false;
  }
});
</script>
</body>
</html>
"""
