"""The Streamlit demo (coming in a later issue)."""
