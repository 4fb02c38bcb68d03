// ragseek's page: ask the store (POST /v1/ask, streamed), open a citation's document with the cited span
// highlighted (GET /v1/documents), add a document (POST /v1/documents). The routes are documented in docs/serve.md.
"use strict";

const $ = (id) => document.getElementById(id);
// characters of the document shown on each side of a cited span
const WINDOW = 20000;
const CITATION = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
const state = { settings: null, answer: null, key: sessionStorage.getItem("ragseek-key") || "", opener: null };

function headers(extra = {}) {
  if (!$("key-field").hidden) state.key = $("api-key").value.trim();
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

function say(element, text, kind = "error") {
  element.textContent = text;
  element.className = `message ${kind}`;
  element.hidden = !text;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body.error) return body.error.message;
  } catch (e) {
    // not JSON: say the status
  }
  return `the server answered ${response.status} ${response.statusText}`;
}

function askForKey(element, message) {
  $("key-field").hidden = false;
  say(element, `${message}: type the server's API key above, then try again.`);
  $("api-key").focus();
}

// Server-sent events: the complete `data:` payloads in `buffer` (parsed JSON) and the incomplete rest.
function takeEvents(buffer) {
  const events = [];
  let cut;
  while ((cut = buffer.indexOf("\n\n")) >= 0) {
    const data = buffer.slice(0, cut).replace(/^data: /, "");
    buffer = buffer.slice(cut + 2);
    if (data !== "[DONE]") events.push(JSON.parse(data));
  }
  return [events, buffer];
}

async function loadSettings() {
  let response;
  try {
    response = await fetch("/v1/ask/settings", { headers: headers() });
  } catch (e) {
    say($("message"), `The server did not answer (${e.message}): is ragseek serve running?`);
    return;
  }
  if (response.status === 401) return askForKey($("message"), await errorOf(response));
  if (!response.ok) return say($("message"), await errorOf(response));
  say($("message"), "");
  const s = (state.settings = await response.json());
  for (const name of ["retriever", "query"]) {
    const select = $(name);
    select.replaceChildren(...s.choices[name].map((v) => new Option(v, v, false, v === s.defaults[name])));
  }
  $("k").value = s.defaults.k;
  $("k").max = s.max_k;
  for (const name of ["retriever", "k", "query"]) $(`${name}-default`).textContent = `(default: ${s.defaults[name]})`;
  $("suffixes").textContent = `(${s.suffixes.join(" ")})`;
  $("file").accept = s.suffixes.join(",");
  const store = s.store;
  $("about").textContent =
    `${s.model} answering from ${store.documents} documents (${store.chunks} chunks) in ${store.path}` +
    (store.chunks ? "" : ": the store is empty, add a document below");
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value;
  say($("message"), "");
  if (!question.trim()) {
    say($("message"), "Type a question first.");
    return $("question").focus();
  }
  const s = state.settings || { defaults: {} };
  const body = {
    question,
    retriever: $("retriever").value || s.defaults.retriever,
    k: Number($("k").value) || s.defaults.k,
    query: $("query").value || s.defaults.query,
    stream: true,
  };
  const answer = $("answer");
  $("ask").disabled = true;
  $("result").hidden = false;
  $("result").setAttribute("aria-busy", "true");
  answer.textContent = "";
  answer.className = "answer streaming";
  for (const id of ["sources", "dont-know-why"]) $(id).replaceChildren();
  $("dont-know-why").hidden = true;
  $("timings").tBodies[0].replaceChildren();
  let final = null;
  try {
    const response = await fetch("/v1/ask", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (response.status === 401) {
      $("result").hidden = true;
      return askForKey($("message"), await errorOf(response));
    }
    if (!response.ok) {
      $("result").hidden = true;
      return say($("message"), await errorOf(response));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let events;
      [events, buffer] = takeEvents(buffer + decoder.decode(value, { stream: true }));
      for (const e of events) {
        if (e.text !== undefined) answer.textContent += e.text;
        else if (e.answer) final = e.answer;
        else if (e.error) say($("message"), e.error.message);
      }
    }
    if (final) render(final);
    else if ($("message").hidden) say($("message"), "The answer stopped before it was complete: ask again.");
  } catch (e) {
    say($("message"), `The server did not answer (${e.message}): is ragseek serve running?`);
  } finally {
    answer.classList.remove("streaming");
    $("result").removeAttribute("aria-busy");
    $("ask").disabled = false;
  }
}

// The final answer: [n] as buttons opening their source, "don't know" as such, the sources and the timings.
function render(a) {
  state.answer = a;
  const answer = $("answer");
  answer.replaceChildren();
  const dontKnow = a.answer === state.settings?.dont_know;
  if (dontKnow) {
    answer.className = "answer dont-know";
    answer.append(a.answer);
    const why = $("dont-know-why");
    why.textContent = a.chunks.length
      ? "The model found no answer in the sources below."
      : "No source passed the don't-know gate: nothing in the store is close enough to the question.";
    why.hidden = false;
  } else {
    const cited = new Set(a.citations.map((c) => c.n));
    let last = 0;
    for (const m of a.answer.matchAll(CITATION)) {
      answer.append(a.answer.slice(last, m.index), "[");
      m[1].split(",").forEach((piece, i) => {
        const n = Number(piece.trim());
        if (i) answer.append(", ");
        answer.append(cited.has(n) ? citeButton(n, "cite", String(n)) : String(n));
      });
      answer.append("]");
      last = m.index + m[0].length;
    }
    answer.append(a.answer.slice(last));
  }
  const cited = new Set(a.citations.map((c) => c.n));
  $("sources").replaceChildren(
    ...a.chunks.map((chunk) => {
      const li = document.createElement("li");
      li.value = chunk.n;
      li.className = cited.has(chunk.n) ? "cited" : "";
      const snippet = document.createElement("span");
      snippet.className = "snippet";
      snippet.textContent = chunk.text.replace(/\s+/g, " ").slice(0, 160);
      li.append(citeButton(chunk.n, "source", chunk.doc_id), ` characters ${chunk.start}–${chunk.end}`);
      li.append(cited.has(chunk.n) ? " (cited)" : "", snippet);
      return li;
    }),
  );
  if (!a.chunks.length) $("sources").append(Object.assign(document.createElement("li"), { textContent: "none" }));
  $("timings").tBodies[0].replaceChildren(
    ...Object.entries(a.timings).map(([step, seconds]) => {
      const row = document.createElement("tr");
      for (const text of [step, seconds.toFixed(3)]) row.append(Object.assign(document.createElement("td"), { textContent: text }));
      return row;
    }),
  );
}

function citeButton(n, kind, label) {
  const chunk = state.answer.chunks[n - 1];
  const button = document.createElement("button");
  button.type = "button";
  button.className = kind;
  button.dataset.n = n;
  button.textContent = label;
  button.setAttribute("aria-label", `source ${n}: ${chunk.doc_id}, characters ${chunk.start} to ${chunk.end}`);
  button.addEventListener("click", () => openSource(n, button));
  return button;
}

// Source [n]'s document with the span the citation names (or, for a source not cited, its chunk) highlighted.
async function openSource(n, opener) {
  const a = state.answer;
  const chunk = a.chunks[n - 1];
  const span = a.citations.find((c) => c.n === n) || chunk;
  const from = Math.max(0, span.start - WINDOW);
  const query = new URLSearchParams({ chunk_id: chunk.chunk_id, start: from, end: span.end + WINDOW });
  let response;
  try {
    response = await fetch(`/v1/documents?${query}`, { headers: headers() });
  } catch (e) {
    return say($("message"), `The server did not answer (${e.message}): is ragseek serve running?`);
  }
  if (!response.ok) return say($("message"), await errorOf(response));
  const doc = await response.json();
  state.opener = opener;
  $("doc-title").textContent = `[${n}] ${doc.title || doc.doc_id}`;
  $("doc-path").textContent = doc.doc_id === doc.source ? doc.source : `${doc.source} · ${doc.doc_id}`;
  $("doc-span").textContent =
    `The cited span: characters ${span.start}–${span.end} of ${doc.chars.toLocaleString("en")}.`;
  const text = $("doc-text");
  const start = span.start - doc.offset;
  const end = span.end - doc.offset;
  const mark = document.createElement("mark");
  mark.id = "highlight";
  mark.dataset.start = span.start;
  mark.dataset.end = span.end;
  mark.textContent = doc.text.slice(start, end);
  const elided = (chars) =>
    Object.assign(document.createElement("span"), {
      className: "elided",
      textContent: `[… ${chars.toLocaleString("en")} characters …]`,
    });
  text.replaceChildren();
  if (doc.offset > 0) text.append(elided(doc.offset), "\n");
  text.append(doc.text.slice(0, start), mark, doc.text.slice(end));
  const after = doc.chars - doc.offset - doc.text.length;
  if (after > 0) text.append("\n", elided(after));
  $("main").classList.add("with-viewer");
  $("viewer").hidden = false;
  $("doc-title").focus({ preventScroll: true });
  // the span's start two lines below the text box's top, and the box on the screen
  text.scrollTop += mark.getBoundingClientRect().top - text.getBoundingClientRect().top - 48;
  $("viewer").scrollIntoView({ block: "nearest" });
}

function closeViewer() {
  $("viewer").hidden = true;
  $("main").classList.remove("with-viewer");
  if (state.opener) state.opener.focus();
}

function upload(event) {
  event.preventDefault();
  const message = $("upload-message");
  const progress = $("upload-progress");
  const file = $("file").files[0];
  if (!file) return say(message, "Choose a file first.");
  const limit = state.settings?.max_body_bytes;
  if (limit && file.size > limit) {
    return say(
      message,
      `${file.name} is ${file.size.toLocaleString("en")} bytes: this server takes at most ` +
        `${limit.toLocaleString("en")} (ragseek serve --max-body-bytes).`,
    );
  }
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/v1/documents?${new URLSearchParams({ name: file.name, stream: "true" })}`);
  for (const [k, v] of Object.entries(headers({ "Content-Type": "application/octet-stream" }))) xhr.setRequestHeader(k, v);
  let buffer = "";
  let seen = 0;
  let finished = false;
  const read = () => {
    buffer += xhr.responseText.slice(seen);
    seen = xhr.responseText.length;
    let events;
    [events, buffer] = takeEvents(buffer);
    for (const e of events) {
      if (e.progress) {
        const p = e.progress;
        progress.value = p.total ? p.done / p.total : 1;
        say(message, `${file.name}: ${p.stage} ${p.done} of ${p.total}`, "ok");
      } else if (e.report) {
        finished = true;
        const r = e.report;
        say(
          message,
          r.stored
            ? `Added ${file.name}: ${r.chunks} chunks, ${r.embedded} embedded, in ${r.seconds.toFixed(1)} s.`
            : `${file.name} is already in the store, unchanged.`,
          "ok",
        );
        loadSettings();
      } else if (e.error) {
        finished = true;
        say(message, e.error.message);
      }
    }
  };
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      progress.value = e.loaded / e.total;
      say(message, `Uploading ${file.name}: ${Math.round((100 * e.loaded) / e.total)}%`, "ok");
    }
  };
  xhr.onprogress = () => xhr.status === 200 && read();
  xhr.onload = async () => {
    $("upload").disabled = false;
    progress.hidden = true;
    if (xhr.status === 200) {
      read();
      if (!finished) say(message, "The upload stopped before the store said it was done: try again.");
      return;
    }
    let text = `the server answered ${xhr.status}`;
    try {
      text = JSON.parse(xhr.responseText).error.message;
    } catch (e) {
      // not JSON: say the status
    }
    if (xhr.status === 401) return askForKey(message, text);
    say(message, text);
  };
  xhr.onerror = () => {
    $("upload").disabled = false;
    progress.hidden = true;
    say(message, "The upload failed: the server did not answer (is ragseek serve running?).");
  };
  $("upload").disabled = true;
  progress.value = 0;
  progress.hidden = false;
  say(message, `Uploading ${file.name}…`, "ok");
  xhr.send(file);
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("upload-form").addEventListener("submit", upload);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("api-key").value = state.key;
  $("api-key").addEventListener("change", () => {
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("ragseek-key", state.key);
    loadSettings();
  });
  $("close-viewer").addEventListener("click", closeViewer);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("viewer").hidden) closeViewer();
  });
  loadSettings();
});
