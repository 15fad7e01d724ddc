// gptkit playground: streams /v1/completions (or /v1/chat/completions in chat mode) into #output.
// No dependencies and no network beyond the server that served this page.
"use strict";
const $ = (id) => document.getElementById(id);
let controller = null;
let chatTemplate = false;

function setStatus(text) { $("status").textContent = text; }
function busy(on) { $("generate").disabled = on; $("stop").disabled = !on; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function number(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

function requestBody(chat) {
  const body = {
    max_tokens: number("max_tokens", (v) => parseInt(v, 10)),
    temperature: number("temperature", parseFloat),
    top_p: number("top_p", parseFloat),
    seed: number("seed", (v) => parseInt(v, 10)),
    stream: true,
  };
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  return body;
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return "HTTP " + resp.status; }
}

async function generate() {
  const chat = chatTemplate && $("mode").value === "chat";
  $("output").textContent = "";
  $("shown_prompt").textContent = chat ? "" : $("prompt").value;
  controller = new AbortController();
  busy(true);
  setStatus("generating");
  let ended = false;
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(chat)), signal: controller.signal,
    });
    if (!resp.ok) { setStatus("error: " + await errorText(resp)); return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    while (!ended) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { ended = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) { setStatus("error: " + chunk.error.message); return; }
          for (const choice of chunk.choices || []) {
            const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
            $("output").textContent += piece;
          }
        }
      }
    }
    setStatus("done");
  } catch (e) {
    setStatus(e.name === "AbortError" ? "done" : "error: " + e.message);
  } finally {
    controller = null;
    busy(false);
  }
}

function stop() {
  if (controller) controller.abort();  // the server sees the connection close and frees the rows
}

async function describeModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) return;
    const model = (await resp.json()).data[0];
    $("model").textContent = model.id;
    chatTemplate = Boolean(model.chat_template);
    $("mode_label").hidden = !chatTemplate;
  } catch (e) { /* the page still works for completions */ }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", stop);
$("api_key").addEventListener("change", describeModel);
$("mode").addEventListener("change", () => {
  $("prompt_label").textContent = $("mode").value === "chat" ? "Message" : "Prompt";
});
describeModel();
