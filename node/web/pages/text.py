"""The patient portal's words, in Simplified Chinese (the default) and English.

Templates call ``t("key")``; a key missing from a language falls back to Chinese, and a key
missing altogether is an error the tests catch (``test_portal`` renders every page in both).
"""

from __future__ import annotations

LANGUAGES = ("zh", "en")
HTML_LANG = {"zh": "zh-CN", "en": "en"}

TEXT: dict[str, dict[str, str]] = {
    "portal": {"zh": "患者门户", "en": "Patient portal"},
    "switch_language": {"zh": "English", "en": "中文"},
    "sign_in": {"zh": "登录", "en": "Sign in"},
    "sign_out": {"zh": "退出登录", "en": "Sign out"},
    "username": {"zh": "用户名", "en": "Username"},
    "password": {"zh": "密码", "en": "Password"},
    "password_again": {"zh": "再次输入密码", "en": "Password again"},
    "enroll": {"zh": "开通账户", "en": "Set up your account"},
    "enroll_intro": {
        "zh": "请输入医院工作人员交给您的开通码，并设置用户名和密码（至少 8 位）。",
        "en": "Enter the enrollment code hospital staff gave you, and choose a username and a "
        "password (at least 8 characters).",
    },
    "enroll_link": {"zh": "第一次使用？用开通码开通账户", "en": "First time? Set up your account"},
    "enrollment_code": {"zh": "开通码", "en": "Enrollment code"},
    "enrolled": {"zh": "账户已开通，请登录。", "en": "Your account is ready. Please sign in."},
    "passwords_differ": {"zh": "两次输入的密码不一致。", "en": "The two passwords differ."},
    "sign_in_failed": {
        "zh": "用户名或密码错误。忘记密码请到医院服务台重新领取开通码。",
        "en": "Wrong username or password. If you forgot your password, ask the hospital's "
        "desk for a new enrollment code.",
    },
    "sign_in_throttled": {
        "zh": "登录失败次数过多，为保护您的账户，请 {minutes} 分钟后再试。"
        "在您以前登录过的网络上登录不受影响；如急需登录，请联系医院。",
        "en": "Too many failed sign-ins: to protect the account, try again in {minutes} "
        "minute(s). Signing in from a network you used before is not held up; if you "
        "cannot wait, contact the hospital.",
    },
    "viewer": {"zh": "影像浏览", "en": "Images"},
    "view_images": {"zh": "查看影像", "en": "View images"},
    "viewer_study": {"zh": "检查 UID", "en": "Study UID"},
    "viewer_series": {"zh": "序列", "en": "Series"},
    "viewer_frames": {"zh": "幅", "en": "frames"},
    "viewer_window": {"zh": "窗宽窗位", "en": "Window"},
    "preset_default": {"zh": "默认", "en": "Default"},
    "preset_lung": {"zh": "肺窗", "en": "Lung"},
    "preset_mediastinum": {"zh": "纵隔窗", "en": "Mediastinum"},
    "preset_bone": {"zh": "骨窗", "en": "Bone"},
    "preset_brain": {"zh": "脑窗", "en": "Brain"},
    "viewer_previous": {"zh": "上一幅", "en": "Previous"},
    "viewer_next": {"zh": "下一幅", "en": "Next"},
    "viewer_hint": {
        "zh": "用鼠标滚轮或方向键逐幅浏览；Home/End 跳到首幅/末幅。",
        "en": "Scroll with the mouse wheel or the arrow keys; Home and End go to the first "
        "and last frame.",
    },
    "viewer_refused": {
        "zh": "无权查看这些影像：需患者同意并先调阅既往结果，或有会诊申请",
        "en": "You may not view these images: it takes the patient's consent and a request "
        "for prior results first, or a consult",
    },
    "viewer_not_found": {"zh": "找不到该检查的影像", "en": "No images of this study were found"},
    "viewer_unavailable": {
        "zh": "影像系统暂时无法访问，请稍后再试",
        "en": "The imaging system cannot be reached now; try again later",
    },
    "viewer_failed": {"zh": "无法显示这些影像", "en": "These images cannot be shown"},
    "viewer_empty": {"zh": "该检查没有可显示的序列", "en": "This study has no series to show"},
    "consults": {"zh": "远程阅片申请", "en": "Consults asked"},
    "consult": {"zh": "远程阅片", "en": "Consult"},
    "consult_new": {"zh": "申请远程阅片", "en": "Ask for a remote read"},
    "consult_no_studies": {
        "zh": "本院没有该患者的影像检查。",
        "en": "This hospital holds no imaging study of this patient.",
    },
    "consult_study": {"zh": "检查", "en": "Study"},
    "consult_reader": {"zh": "阅片医院", "en": "Reading hospital"},
    "consult_priority": {"zh": "优先级", "en": "Priority"},
    "consult_within": {"zh": "{minutes} 分钟内出报告", "en": "report within {minutes} min"},
    "consult_question": {"zh": "临床问题", "en": "Clinical question"},
    "consult_send": {"zh": "发送申请", "en": "Send the request"},
    "consult_requested": {"zh": "已发送远程阅片申请。", "en": "The consult was sent."},
    "consult_cancelled": {"zh": "已撤销远程阅片申请。", "en": "The consult was cancelled."},
    "consult_none": {"zh": "暂无会诊。", "en": "No consults yet."},
    "consult_deadline": {"zh": "截止时间", "en": "Deadline"},
    "consult_status": {"zh": "状态", "en": "Status"},
    "consult_undelivered": {
        "zh": "对方暂时无法联系，恢复后自动送达（截止时间照常计算）",
        "en": "the reader cannot be reached now; it is sent when it returns (the deadline "
        "still counts)",
    },
    "consult_unknown": {"zh": "没有这个会诊。", "en": "No such consult."},
    "consult_cancel": {"zh": "撤销申请", "en": "Cancel the consult"},
    "consult_cancel_reason": {"zh": "撤销原因", "en": "Why"},
    "consult_left": {"zh": "剩余时间", "en": "Time left"},
    "consult_from": {"zh": "申请医院", "en": "Asked by"},
    "consult_owner": {"zh": "阅片医生", "en": "Radiologist"},
    "consult_open": {"zh": "打开", "en": "Open"},
    "consult_claim": {"zh": "认领", "en": "Claim"},
    "consult_release": {"zh": "放回列表", "en": "Release"},
    "consult_minutes_left": {"zh": "还剩 {minutes} 分钟", "en": "{minutes} min left"},
    "consult_overdue": {"zh": "已超时 {minutes} 分钟", "en": "{minutes} min overdue"},
    "reading": {"zh": "阅片工作列表", "en": "Reading worklist"},
    "reading_empty": {"zh": "没有待阅片的会诊。", "en": "No consults wait to be read."},
    "reading_done": {"zh": "已完成或已撤销", "en": "Done or cancelled"},
    "priority_stat": {"zh": "危急", "en": "Stat"},
    "priority_urgent": {"zh": "急诊", "en": "Urgent"},
    "priority_routine": {"zh": "常规", "en": "Routine"},
    "status_requested": {"zh": "待阅片", "en": "waiting"},
    "status_received": {"zh": "已送达", "en": "received"},
    "status_accepted": {"zh": "阅片中", "en": "being read"},
    "status_in-progress": {"zh": "阅片中", "en": "being read"},
    "status_completed": {"zh": "已出报告", "en": "reported"},
    "status_cancelled": {"zh": "已撤销", "en": "cancelled"},
    "report": {"zh": "影像诊断报告", "en": "Imaging report"},
    "report_amended": {"zh": "已修订", "en": "amended"},
    "report_findings": {"zh": "所见", "en": "Findings"},
    "report_impression": {"zh": "诊断意见", "en": "Impression"},
    "report_sign_send": {"zh": "签名并发送报告", "en": "Sign and send the report"},
    "report_amend": {"zh": "修订并重新签名发送", "en": "Amend, sign again and send"},
    "report_signed_hint": {
        "zh": "报告以本院节点密钥签名，申请医院可按联盟名册核验；修订保留旧版本。",
        "en": "The report is signed with this hospital's node key, which the requester checks "
        "against the roster; an amendment keeps the old version.",
    },
    "report_sent": {
        "zh": "报告已签名并送达申请医院。",
        "en": "The report was signed and delivered.",
    },
    "report_kept": {
        "zh": "报告已签名保存；申请医院暂时无法联系或已撤销申请",
        "en": "The report is signed and kept here; the requester cannot be reached now or "
        "cancelled the consult",
    },
    "signature_valid": {
        "zh": "签名有效：由{member}签发，报告内容未被改动。",
        "en": "Signature valid: signed by {member}; the report is as it was signed.",
    },
    "signature_invalid": {"zh": "签名无效", "en": "Signature invalid"},
    "turnaround": {"zh": "阅片时效", "en": "Reading turnaround"},
    "turnaround_hint": {
        "zh": "时效从账本计算：自申请记录到首次报告记录的时间；任何审计方都能复算。",
        "en": "Computed from the ledger: from the request entry to the first report entry; any "
        "auditor can compute it again.",
    },
    "median": {"zh": "中位数", "en": "Median"},
    "reported": {"zh": "已报告", "en": "Reported"},
    "within_deadline": {"zh": "按时率", "en": "Within deadline"},
    "open": {"zh": "进行中", "en": "Open"},
    "cancelled": {"zh": "已撤销", "en": "Cancelled"},
    "clinic_sign_in_failed": {"zh": "用户名或密码错误。", "en": "Wrong username or password."},
    "form_expired": {
        "zh": "表单已失效或并非来自本站，请刷新页面后重试。",
        "en": "The form has expired or did not come from this site; reload the page and try again.",
    },
    "signed_out": {"zh": "您已退出登录。", "en": "You have signed out."},
    "my_consents": {"zh": "我的授权", "en": "My consents"},
    "who_accessed": {"zh": "谁查看了我的记录", "en": "Who accessed my records"},
    "consents_intro": {
        "zh": "您决定哪些医院可以在转诊时查看您在本院的哪些记录。未经授权，其他医院看不到您的记录"
        "（急诊抢救除外，且会被记录并告知您）。",
        "en": "You decide which hospitals may see which of your records here when you are "
        "referred. Without your consent no other hospital sees them (except in an emergency, "
        "which is recorded and shown to you).",
    },
    "no_consents": {"zh": "您还没有授权。", "en": "You have not granted any consent."},
    "grant_new": {"zh": "新增授权", "en": "Grant a new consent"},
    "edit_consent": {"zh": "修改授权", "en": "Change this consent"},
    "hospitals": {"zh": "医院", "en": "Hospitals"},
    "all_members": {"zh": "医联体内所有医院", "en": "Every hospital of the consortium"},
    "categories": {"zh": "记录类别", "en": "Kinds of records"},
    "purposes": {"zh": "用途", "en": "Purposes"},
    "valid_from": {"zh": "生效日期", "en": "From"},
    "valid_to": {"zh": "截止日期（可不填）", "en": "Until (optional)"},
    "open_ended": {"zh": "长期有效", "en": "no end date"},
    "save": {"zh": "保存", "en": "Save"},
    "grant": {"zh": "授权", "en": "Grant"},
    "revoke": {"zh": "撤销授权", "en": "Revoke"},
    "revoked_on": {"zh": "已撤销", "en": "revoked"},
    "status_active": {"zh": "有效", "en": "active"},
    "status_inactive": {"zh": "已撤销", "en": "revoked"},
    "status_draft": {"zh": "草稿", "en": "draft"},
    "status_proposed": {"zh": "待确认", "en": "proposed"},
    "status_rejected": {"zh": "已拒绝", "en": "rejected"},
    "status_entered-in-error": {"zh": "录入错误", "en": "entered in error"},
    "recorded_at": {"zh": "登记于", "en": "recorded at"},
    "recorded_elsewhere": {
        "zh": "在其他医院登记的授权（来自医联体账本）",
        "en": "Consents recorded at other hospitals (from the consortium ledger)",
    },
    "receipt": {"zh": "凭证", "en": "Receipt"},
    "receipt_help": {
        "zh": "凭证可离线验证：hrx audit receipt 凭证文件",
        "en": "Receipts can be verified offline: hrx audit receipt FILE",
    },
    "choose_one": {
        "zh": "请至少选择一家医院、一个记录类别和一种用途。",
        "en": "Choose at least one hospital, one kind of record and one purpose.",
    },
    "bad_date": {"zh": "日期格式应为 年-月-日。", "en": "Dates are written year-month-day."},
    "saved": {
        "zh": "已保存，并已记入医联体账本。",
        "en": "Saved and recorded on the consortium ledger.",
    },
    "revoked": {
        "zh": "授权已撤销，并已记入医联体账本。",
        "en": "Consent revoked and recorded on the consortium ledger.",
    },
    "changed_meanwhile": {
        "zh": "该授权已在别处被修改，请查看最新内容后再操作。",
        "en": "This consent was changed meanwhile; look at it again before changing it.",
    },
    "cross_institution": {
        "zh": "其他医院的调阅（来自医联体账本）",
        "en": "Other hospitals (from the consortium ledger)",
    },
    "local_reads": {"zh": "本院的查看记录", "en": "Within this hospital"},
    "no_accesses": {"zh": "暂无记录。", "en": "None so far."},
    "when": {"zh": "时间", "en": "When"},
    "who": {"zh": "谁", "en": "Who"},
    "what": {"zh": "内容", "en": "What"},
    "decision": {"zh": "结果", "en": "Decision"},
    "permit": {"zh": "允许", "en": "permitted"},
    "deny": {"zh": "拒绝", "en": "denied"},
    "break_glass": {"zh": "急诊紧急调阅", "en": "Emergency (break-glass) access"},
    "requested": {"zh": "已申请", "en": "requested"},
    "located": {"zh": "记录定位", "en": "Record locator"},
    "images_read": {"zh": "调阅影像", "en": "Images viewed"},
    "images_read_permit": {
        "zh": "查看了您在{source}的影像（首次查看时记录）",
        "en": "viewed your images held at {source} (recorded at the first view)",
    },
    "images_read_deny": {
        "zh": "请求查看您在{source}的影像，被拒绝",
        "en": "asked to view your images held at {source}, and was refused",
    },
    "located_holders": {
        "zh": "查询了哪些机构存有您的记录，找到 {n} 家",
        "en": "looked up which members hold your records: {n} found",
    },
    "history_from": {
        "zh": "其他医院的记录由 {witness} 提供；每次打开本页，本院都会把这次查询记入医联体账本。",
        "en": "What other hospitals recorded comes from {witness}; each time this page opens, "
        "this hospital records the question on the consortium ledger.",
    },
    "history_missing": {
        "zh": "暂时无法取得其他医院记录的调阅，下面只列出本院账本上的记录。请稍后再试。",
        "en": "What other hospitals recorded cannot be fetched now; only this hospital's ledger "
        "is shown below. Please try again later.",
    },
    "history_partial": {
        "zh": "记录较多，只列出最近的部分。",
        "en": "There are many entries: only the most recent are shown.",
    },
    "action_R": {"zh": "查看", "en": "read"},
    "action_C": {"zh": "新建", "en": "created"},
    "action_U": {"zh": "修改", "en": "changed"},
    "action_D": {"zh": "删除", "en": "deleted"},
    "action_E": {"zh": "操作", "en": "used"},
    "outcome_refused": {"zh": "被拒绝", "en": "refused"},
    "not_found": {"zh": "找不到该页面。", "en": "This page does not exist."},
    "error": {"zh": "出错了", "en": "Something went wrong"},
    "back": {"zh": "返回", "en": "Back"},
    "cat_laboratory": {"zh": "检验结果", "en": "Laboratory results"},
    "cat_imaging": {"zh": "影像检查", "en": "Imaging"},
    "cat_vital-signs": {"zh": "生命体征", "en": "Vital signs"},
    "cat_procedure": {"zh": "手术与操作", "en": "Procedures"},
    "cat_exam": {"zh": "体格检查", "en": "Physical examination"},
    "cat_therapy": {"zh": "治疗", "en": "Therapy"},
    "cat_social-history": {"zh": "个人史", "en": "Social history"},
    "cat_survey": {"zh": "量表评估", "en": "Assessments"},
    "cat_activity": {"zh": "日常活动", "en": "Activity"},
    "purpose_TREAT": {"zh": "诊疗", "en": "Treatment"},
    "purpose_ETREAT": {"zh": "急诊抢救", "en": "Emergency treatment"},
    "purpose_HRESCH": {"zh": "医学研究", "en": "Health research"},
    "purpose_PUBHLTH": {"zh": "公共卫生与统计", "en": "Public health and statistics"},
    "purposes_hint": {
        "zh": "医学研究、公共卫生与统计只在您勾选时才可使用您的记录；"
        "用于研究时，医院须经伦理审批后向各医院申请。",
        "en": "Research, public health and statistics may use your records only if you tick "
        "them; for research, a hospital asks the others only with its ethics approval.",
    },
    "clinic": {"zh": "医生工作台", "en": "Clinic"},
    "referred_patients": {"zh": "转诊患者", "en": "Referred patients"},
    "find_patient": {"zh": "按身份证号查找患者", "en": "Find a patient by identifier"},
    "find": {"zh": "查找", "en": "Find"},
    "no_patients": {"zh": "没有找到患者。", "en": "No patient found."},
    "prior_results": {"zh": "既往检查检验结果", "en": "Prior results"},
    "fetch_prior": {
        "zh": "向医联体成员查询既往结果（查询将记入医联体账本，患者可见）",
        "en": "Ask the consortium's members for prior results (recorded on the ledger; the "
        "patient sees it)",
    },
    "recognised_until": {"zh": "互认有效期至", "en": "Recognised until"},
    "accept_instead": {"zh": "采用此结果（不再重复检查）", "en": "Accept instead of a new exam"},
    "reorder": {"zh": "仍要重新检查", "en": "Order again"},
    "reorder_reason": {"zh": "重新检查的理由", "en": "Reason to order again"},
    "reorder_text": {"zh": "说明（选“其他”时必填）", "en": "Explanation (required for other)"},
    "reorder_condition-changed": {"zh": "病情变化", "en": "Condition changed"},
    "reorder_fast-changing": {"zh": "检验结果变化快", "en": "Fast-changing result"},
    "reorder_critical-decision": {"zh": "手术、输血等重大医疗决策", "en": "Critical decision"},
    "reorder_emergency": {"zh": "急诊、急救", "en": "Emergency"},
    "reorder_appraisal": {"zh": "司法、伤残鉴定", "en": "Forensic or disability appraisal"},
    "reorder_other": {"zh": "其他", "en": "Other"},
    "clinic_accepted": {
        "zh": "已采用互认结果，节省的费用已记入医联体账本。",
        "en": "The recognised result was accepted; the saving is on the consortium ledger.",
    },
    "clinic_reordered": {
        "zh": "已重新开具检查，理由已记入医联体账本。",
        "en": "The exam was ordered again; the reason is on the consortium ledger.",
    },
    "savings": {"zh": "互认节省", "en": "Savings"},
    "savings_by_month": {"zh": "按月节省金额", "en": "Savings by month"},
    "exams_avoided": {"zh": "次检查未重复", "en": "exams avoided"},
    "amount_saved": {"zh": "节省", "en": "saved"},
    "by_member": {"zh": "按医院", "en": "By hospital"},
    "by_item": {"zh": "按项目", "en": "By item"},
    "reordered_anyway": {"zh": "仍重新检查", "en": "Ordered again"},
}


def translate(language: str, key: str) -> str:
    entry = TEXT[key]
    return entry.get(language) or entry["zh"]
