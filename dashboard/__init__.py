"""The Streamlit viewer of finished audits: `streamlit run dashboard/app.py` (or `python -m dashboard`).

It reads through `microscope.results` only: it never imports Prefect and never computes a stage.
`app.py` holds the page config, the sidebar (store, audit) and `st.navigation` over `views/`; `state.py`
the selection kept in the URL's query parameters and the cached loaders; `exports.py` the table
downloads; `charts.py` the Altair charts.
"""
