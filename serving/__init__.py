"""raypipe's Ray Serve application: any raypipe checkpoint behind an OpenAI-compatible API, plus a demo page.

`serving.app:build_app` is the Serve import path (`serve run serving/config.yaml`, `raypipe serve <run>`).
"""
