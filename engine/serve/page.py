"""The web page at `/`: a form for one generation or edit, and the images with their settings
and timing. Plain HTML and JavaScript posting JSON to /v1/images/generations, or, once an init
image is chosen, a multipart form to /v1/images/edits (img2img; inpainting with a mask);
nothing to build."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dite serve: {{MODEL}}</title>
<style>
 body { font-family: sans-serif; margin: 2em; max-width: 60em; }
 label { display: block; margin: .4em 0; }
 input[type=text] { width: 30em; }
 #results figure { display: inline-block; margin: .5em; vertical-align: top; }
 #results img { width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid #ccc; }
 #results figcaption { font-size: .8em; max-width: 192px; word-wrap: break-word; }
 #error { color: #b00; }
</style>
</head>
<body>
<h1>dite serve</h1>
<p>Model <code id="model">{{MODEL}}</code> (family <code id="family">{{FAMILY}}</code>).
A DiT model takes a class name or index as its prompt.</p>
<form id="form">
 <label>Prompt <input type="text" id="prompt" name="prompt" required></label>
 <label>Negative prompt <input type="text" id="negative_prompt" name="negative_prompt"></label>
 <label>Size <input type="text" id="size" name="size" placeholder="model default, e.g. 64x64"></label>
 <label>Steps <input type="number" id="steps" name="steps" min="1" placeholder="model default"></label>
 <label>Seed <input type="number" id="seed" name="seed" min="0" placeholder="random"></label>
 <label>Accel <input type="text" id="accel" name="accel" placeholder="e.g. ditcache+promptgate"></label>
 <fieldset><legend>Edit an image (optional)</legend>
  <label>Init image <input type="file" id="image" name="image" accept="image/*"></label>
  <label>Mask, white = repaint (optional: inpainting) <input type="file" id="mask" name="mask" accept="image/*"></label>
  <label>Strength <input type="number" id="strength" name="strength" min="0" max="1" step="0.05" placeholder="0.6"></label>
 </fieldset>
 <button type="submit" id="generate">Generate</button> <span id="status"></span>
</form>
<p id="error"></p>
<div id="results"></div>
<script>
const field = (id) => document.getElementById(id).value.trim();
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const family = document.getElementById("family").textContent;
  const fields = {response_format: "b64_json"};
  if (family === "dit") { fields.class_label = field("prompt"); } else { fields.prompt = field("prompt"); }
  if (field("negative_prompt") && family !== "dit") fields.negative_prompt = field("negative_prompt");
  if (field("size")) fields.size = field("size");
  if (field("steps")) fields.steps = parseInt(field("steps"), 10);
  if (field("seed")) fields.seed = parseInt(field("seed"), 10);
  if (field("accel")) fields.accel = field("accel");
  const image = document.getElementById("image").files[0], mask = document.getElementById("mask").files[0];
  const status = document.getElementById("status"), error = document.getElementById("error");
  status.textContent = "generating..."; error.textContent = "";
  const start = performance.now();
  let request;
  if (image) {  // an edit: OpenAI's multipart form, every field as text
    const form = new FormData();
    Object.entries(fields).forEach(([k, v]) => form.append(k, String(v)));
    if (field("strength")) form.append("strength", field("strength"));
    form.append("image", image);
    if (mask) form.append("mask", mask);
    request = fetch("/v1/images/edits", {method: "POST", body: form});
  } else {
    request = fetch("/v1/images/generations", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(fields)});
  }
  try {
    const response = await request;
    const reply = await response.json();
    if (!response.ok) { throw new Error(reply.error ? reply.error.message : response.statusText); }
    const seconds = ((performance.now() - start) / 1000).toFixed(2);
    reply.data.forEach((item, k) => {
      const p = reply.dite.parameters[k], t = reply.dite.timings;
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.className = "result"; img.alt = p.prompt || String(p.class_label);
      img.src = "data:image/png;base64," + item.b64_json;
      const caption = document.createElement("figcaption");
      caption.textContent = `${img.alt} | ${p.size}, ${p.steps} steps, guidance ${p.guidance}, seed ${p.seed}, ` +
        `accel ${p.accel}` + (p.strength !== undefined ? `, strength ${p.strength}` : "") +
        (p.mask ? ", inpainted" : "") + ` | ${seconds} s (denoise ${t.denoise.toFixed(2)} s, batch of ${reply.dite.batch_images})`;
      figure.append(img, caption);
      document.getElementById("results").prepend(figure);
    });
    status.textContent = "";
  } catch (e) { status.textContent = ""; error.textContent = e.message; }
});
</script>
</body>
</html>
"""
