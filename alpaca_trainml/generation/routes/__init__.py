"""serve.py's routes by group: common (the steps every generating route shares), instruct (the trainML route),
openai_api (the OpenAI-compatible API) and status (/health). Each group's add_routes(app, model, engine, name) adds its
routes to the app that generation/server.create_app builds."""
