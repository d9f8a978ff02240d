"""Front ends: the ComfyUI extension (``web/js``) and the standalone Gradio panel."""
